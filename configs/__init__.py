"""Built-in experiment, Accelerate and DeepSpeed configs, installed as `kdscale.configs` so
that an installed kdscale finds them too (see `kdscale.configs.path`)."""

from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """A built-in config file, e.g. `path("deepspeed/teacher_zero3.json")`."""
    return Path(str(files(__name__) / name))

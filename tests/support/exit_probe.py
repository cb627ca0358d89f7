"""How a launched process ends. A `sitecustomize` module, imported by every interpreter that
finds it first on the path, marks in a folder each launched rank's run of its exit handlers
and, from an object's finaliser, its entry into the interpreter's teardown: a process that
ends without the teardown leaves the first mark alone."""

from __future__ import annotations

import os
from pathlib import Path

PROBE = """
import atexit, os
if "RANK" in os.environ:
    marks = os.path.join(os.environ["PROBE_DIR"], "rank" + os.environ["RANK"])
    class _Teardown:  # what its finaliser uses is bound now: teardown empties the modules
        def __del__(self, path=marks + "-teardown", open=open):
            open(path, "w").close()
    _teardown = _Teardown()
    atexit.register(lambda path=marks + "-exit-handlers": open(path, "w").close())
"""

# Both ranks ran their exit handlers, and neither entered the teardown.
EXIT_HANDLERS_ONLY = ["rank0-exit-handlers", "rank1-exit-handlers"]


def probe_env(folder: Path) -> dict[str, str]:
    """The variables that put the probe, written to `folder`, on a launch's path."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PROBE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "PROBE_DIR": str(folder)}


def exit_marks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("rank"))

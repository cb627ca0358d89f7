"""kdscale: distributed knowledge distillation for BERT-family models.

The public surface is small; the command line (`kdscale --help`) drives the pipeline.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so that `import kdscale` (and
# `kdscale --help`) does not pay for torch and transformers.
_EXPORTS = {
    "Config": "kdscale.config",
    "load_config": "kdscale.config",
    "KDLoss": "kdscale.train.losses",
    "kd_loss": "kdscale.kernels",
    "LogitCache": "kdscale.cache",
    "DistillationTrainer": "kdscale.hf",
    "student_from_teacher": "kdscale.models",
    "KdscaleError": "kdscale.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdscale' has no attribute {name!r}")

"""The Hugging Face `Trainer` path: swap `Trainer` for `DistillationTrainer`, point it at a
teacher or a logit cache, keep everything else."""

from kdscale.distributed import end_process
from kdscale.hf.arguments import DistillationArguments, DistillationTrainingArguments
from kdscale.hf.trainer import DistillationTrainer

__all__ = ["DistillationArguments", "DistillationTrainer", "DistillationTrainingArguments",
           "end_process"]

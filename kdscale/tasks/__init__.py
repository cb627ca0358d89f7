"""The tasks kdscale distils (`task:` in a config); see `kdscale.tasks.base`."""

from __future__ import annotations

from kdscale.data.batch import IGNORE_INDEX
from kdscale.tasks.base import CacheLayout, Task, cache_entries

TASKS = ("classification", "mlm", "pretraining", "token-classification", "question-answering")


def get_task(name: str) -> Task:
    # Imported on use: each task pulls in its own model class and metrics.
    if name == "classification":
        from kdscale.tasks.classification import SequenceClassification

        return SequenceClassification()
    if name == "mlm":
        from kdscale.tasks.mlm import MaskedLM

        return MaskedLM()
    if name == "pretraining":
        from kdscale.tasks.pretraining import Pretraining

        return Pretraining()
    if name == "token-classification":
        from kdscale.tasks.token_classification import TokenClassification

        return TokenClassification()
    if name == "question-answering":
        from kdscale.tasks.question_answering import QuestionAnswering

        return QuestionAnswering()
    raise ValueError(f"task: expected one of {TASKS}, got {name!r}")


__all__ = ["IGNORE_INDEX", "TASKS", "CacheLayout", "Task", "cache_entries", "get_task"]

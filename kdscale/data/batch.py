"""What every batch carries, for the model and for the loss: the bottom of the import order,
so that data, tasks, training and evaluation share one definition."""

from __future__ import annotations

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IGNORE_INDEX = -100  # a label entry that is not a row of the loss (PyTorch's convention)


def model_inputs(batch: dict) -> dict:
    """The entries of `batch` a model's forward takes (not labels, ids or teacher outputs)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def valid_rows(batch: dict) -> torch.Tensor:
    """How many label entries of `batch` are rows of the loss (a 0-d tensor)."""
    return (batch["labels"] != IGNORE_INDEX).sum()

"""A masked LM's head on the rows a loss reads, not on every position.

A BERT masked LM maps each position's hidden state through its head (transform, LayerNorm and
the decoder tied to the word embeddings) to the whole vocabulary, then the loss keeps the
masked ~15% of positions. Within `head_on_rows` the head's input is cut to those positions
first, so the [B, T, V] logits (and their gradient) are never built: the model returns
[R, V], in the row-major order of `logits[rows]`. It is a forward pre-hook, removed on exit:
the model itself is unchanged and saves as a plain masked LM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that maps hidden states to vocabulary logits: BERT's `cls.predictions`
    (transform, LayerNorm, decoder), else the model's output embeddings (the decoder)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DDP or a DeepSpeed engine
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if isinstance(predictions, torch.nn.Module):
        return predictions
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


@contextmanager
def head_on_rows(model: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within, the model's LM head runs on the positions where `rows` [B, T] is True only."""
    head = lm_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head to run on the masked rows")

    def keep_rows(module, args):
        hidden = args[0]
        return (hidden[rows.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(keep_rows)
    try:
        yield
    finally:
        handle.remove()

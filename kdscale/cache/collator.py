"""Attach cached teacher logits to each batch by example id, around any base collator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdscale.cache.reader import LogitCache


class TeacherLogitsCollator:
    """`base(examples)` plus, looked up by the examples' `example_id` (added to the batch
    where `base` drops it):

    dense caches: `teacher_logits` [B, C];
    top-k caches: `teacher_topk_values` [R, k], `teacher_topk_indices` [R, k] (int64, -1 pads);
    per-position top-k caches also `teacher_topk_positions` [R] (the token of each row) and
    `teacher_topk_counts` [B] (rows of each example, in batch order; 0 when none is masked).
    """

    def __init__(self, base: Callable[[list[dict]], dict], cache: LogitCache):
        self.base, self.cache = base, cache

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        if "example_id" not in batch:  # a base collator that keeps only the model's inputs
            batch["example_id"] = torch.tensor([e["example_id"] for e in examples])
        ids = batch["example_id"]
        if self.cache.manifest.kind == "dense":
            batch["teacher_logits"] = self.cache.get(ids)
            return batch
        topk = self.cache.get_topk(ids)
        batch["teacher_topk_values"], batch["teacher_topk_indices"] = topk.values, topk.indices
        if topk.positions is not None:
            batch["teacher_topk_positions"] = topk.positions
            batch["teacher_topk_counts"] = topk.counts
        return batch


class EnsembleLogitsCollator:
    """`base(examples)` plus `teacher_logits_ensemble` [K, B, C]: the dense logits of K
    teachers' caches for the batch, in the order of `caches`."""

    def __init__(self, base: Callable[[list[dict]], dict], caches: list[LogitCache]):
        self.base, self.caches = base, caches

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        batch["teacher_logits_ensemble"] = torch.stack(
            [cache.get(batch["example_id"]) for cache in self.caches])
        return batch

"""Attach cached teacher logits to each batch by example id, around any base collator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdscale.cache.reader import LogitCache


class TeacherLogitsCollator:
    """`base(examples)` plus `teacher_logits` (dense caches) or `teacher_topk_values` and
    `teacher_topk_indices` (top-k caches), looked up by the batch's `example_id`."""

    def __init__(self, base: Callable[[list[dict]], dict], cache: LogitCache):
        self.base, self.cache = base, cache

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        ids = batch["example_id"]
        if self.cache.manifest.kind == "topk":
            batch["teacher_topk_values"], batch["teacher_topk_indices"] = self.cache.get_topk(ids)
        else:
            batch["teacher_logits"] = self.cache.get(ids)
        return batch

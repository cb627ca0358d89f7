"""Attach cached teacher logits to each batch by example id, around any base collator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdscale.cache.format import CacheError
from kdscale.cache.reader import LogitCache


class TeacherLogitsCollator:
    """A collator that adds each batch's cached teacher outputs, around any base collator.

    A batch is `base(examples)` plus, looked up by the examples' `example_id` (added to the
    batch where `base` drops it):

    dense caches: `teacher_logits` [B, C];
    top-k caches: `teacher_topk_values` [R, k], `teacher_topk_indices` [R, k] (int64, -1 pads);
    per-position top-k caches also `teacher_topk_positions` [R] (the token of each row) and
    `teacher_topk_counts` [B] (rows of each example, in batch order; 0 when none is masked).

    Args:
        base: the collator of the model's inputs, e.g. a `DataCollatorWithPadding`.
        cache: the logit cache; every example's `example_id` must be in it.

    Raises:
        CacheError: when called, for NaN or inf teacher values in the batch's rows.
        KeyError: when called, for an example id that is not in the cache.
    """

    def __init__(self, base: Callable[[list[dict]], dict], cache: LogitCache):
        self.base, self.cache = base, cache

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        if "example_id" not in batch:  # a base collator that keeps only the model's inputs
            batch["example_id"] = torch.tensor([e["example_id"] for e in examples])
        ids = batch["example_id"]
        if self.cache.manifest.kind == "dense":
            batch["teacher_logits"] = finite(self.cache.get(ids), ids, self.cache)
            return batch
        topk = self.cache.get_topk(ids)
        finite(topk.values.masked_fill(topk.indices < 0, 0), ids, self.cache)  # pads may be -inf
        batch["teacher_topk_values"], batch["teacher_topk_indices"] = topk.values, topk.indices
        if topk.tail is not None:
            batch["teacher_topk_tail"] = finite(topk.tail, ids, self.cache)
        if topk.positions is not None:
            batch["teacher_topk_positions"] = topk.positions
            batch["teacher_topk_counts"] = topk.counts
        return batch


class EnsembleLogitsCollator:
    """A collator that adds the dense logits of K teachers' caches to each batch.

    A batch is `base(examples)` plus `teacher_logits_ensemble` [K, B, C], in the order of
    `caches`; `base` must keep `example_id`.
    """

    def __init__(self, base: Callable[[list[dict]], dict], caches: list[LogitCache]):
        self.base, self.caches = base, caches

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(examples)
        ids = batch["example_id"]
        batch["teacher_logits_ensemble"] = torch.stack(
            [finite(cache.get(ids), ids, cache) for cache in self.caches])
        return batch


def finite(logits: torch.Tensor, ids: torch.Tensor, cache: LogitCache) -> torch.Tensor:
    """`logits`, checked to be finite; CacheError naming the example ids otherwise.

    The writer refuses NaN and inf, but a shard can be damaged on disk or written by other
    code; one such row would turn every weight to NaN at the next step, silently. Checked
    on the batch's few rows, before the step, so no checkpoint holds its result.
    """
    bad = ~torch.isfinite(logits)
    if bad.any():
        rows = bad.reshape(len(logits), -1).any(dim=1) if len(logits) == len(ids) else None
        named = ids[rows].tolist()[:5] if rows is not None else ids.tolist()[:5]
        raise CacheError(f"the logit cache at {cache.directory} holds NaN or inf teacher logits "
                         f"for example ids {named}; expected finite values. `kdscale cache` "
                         f"with this config rewrites the damaged shards")
    return logits

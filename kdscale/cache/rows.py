"""What a shard holds, and why a row is refused: the checks every write runs before any byte lands.

`shard_tensors` turns the rows given to `write_shard` or `CacheWriter.add` into the tensors of a
shard (layout in `kdscale.cache.format`), cast to the cache dtype. It raises CacheError for
anything a reader or the loss could not use: mismatched shapes, NaN or inf teacher outputs (also
after a cast that overflows), top-k indices outside the vocabulary, an example twice in one shard.
"""

from __future__ import annotations

from typing import Any

import torch

from kdscale.cache.format import DTYPES, CacheError, check_settings, few
from kdscale.cache.quantize import quantize_rows
from kdscale.cache.sizes import INDEX_DTYPES, narrowest_index_dtype


def shard_tensors(example_ids: Any, logits: Any, values: Any, indices: Any, positions: Any,
                  empty_ids: Any, *, dtype: str, num_outputs: int, k: int | None,
                  tail: Any = None, index_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a shard (layout in `kdscale.cache.format`), cast to the cache dtype
    (top-k indices to `index_dtype`; None: the narrowest the outputs need); CacheError,
    before anything is written, for anything a reader or the loss could not use."""
    if (logits is None) == (values is None and indices is None):
        raise CacheError("a shard takes logits (dense), or values and indices (topk, with "
                         "positions for one row per masked position): one of the two")
    kind = "dense" if logits is not None else "topk"
    if kind == "topk":
        index_dtype = index_dtype or narrowest_index_dtype(num_outputs)
    check_settings(kind, num_outputs, k, dtype, where="cache setting", index_dtype=index_dtype)
    ids = _int_vector("example_ids", example_ids)
    if kind == "dense":
        if positions is not None or empty_ids is not None:
            raise CacheError("positions and empty_ids belong to a topk shard, not a dense one")
        logits = _rows("logits", logits, len(ids), num_outputs, "num_outputs")
        out = {"logits": _to_storage("logits", logits, ids, dtype)}
    else:
        out = _topk(ids, values, indices, dtype, num_outputs, k, index_dtype)
    if tail is not None:
        if kind == "dense":
            raise CacheError("tail belongs to a topk shard: a dense row has no mass left out")
        out["tail"] = _tail(tail, ids)
    if positions is None and empty_ids is None:
        _refuse_repeats(ids, "each example is cached once (drop padded duplicates by id)")
    else:
        out |= _per_position(ids, positions, empty_ids)
    return {"example_ids": ids, **out}


def join_shard_tensors(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One shard from the `shard_tensors` of its batches, in order: a shard is kept as stored
    rows while it fills, never as the teacher's float32 ones (a wide row, such as every logit
    of a vocabulary, would otherwise hold several times the shard's bytes)."""
    joined = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    if "examples" in joined:
        _refuse_repeats(joined["examples"], "the rows of an example must be contiguous")
    else:
        _refuse_repeats(joined["example_ids"], "each example is cached once")
    return runs_then_empty(joined)


def runs_then_empty(shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A per-position shard's examples as `shard_tensors` orders them, those with rows (in
    row order) and then those without: a shard's bytes do not depend on how its rows were
    batched."""
    if "counts" not in shard:
        return shard
    empty = shard["counts"] == 0
    order = torch.cat([(~empty).nonzero().flatten(), empty.nonzero().flatten()])
    return shard | {"examples": shard["examples"][order], "counts": shard["counts"][order]}


def _int_vector(name: str, x: Any) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() == 1 and t.numel() == 0:
        return t.to(torch.int64)  # torch.as_tensor([]) is float32
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise CacheError(f"{name}: expected a 1-D integer tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    return t.to(torch.int64)


def _rows(name: str, t: Any, n: int, width: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise CacheError(f"{name}: expected a 2-D tensor [rows, {what}]")
    if t.shape[0] != n:
        raise CacheError(f"{name} has {t.shape[0]} rows but example_ids has {n}")
    if t.shape[1] != width:
        raise CacheError(f"{name} has {t.shape[1]} columns, expected {what}={width}")
    return t.detach().cpu()


def _to_storage(name: str, x: torch.Tensor, ids: torch.Tensor, dtype: str,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Casts to the cache dtype; refuses NaN/inf before and after (fp16 overflows at 65504)."""
    if not x.dtype.is_floating_point:
        raise CacheError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    stored = x.to(DTYPES[dtype][0]).contiguous()
    _refuse_nonfinite(name, x, ids, valid, "are not finite",
                      "the teacher produced NaN or inf (check its weights and inputs)")
    _refuse_nonfinite(name, stored, ids, valid, f"overflow {dtype}", "store the cache as float32")
    return stored


def _refuse_nonfinite(name: str, t: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None,
                      what: str, remedy: str) -> None:
    bad = ~torch.isfinite(t) if valid is None else ~torch.isfinite(t) & valid
    rows = bad.any(dim=1)
    if rows.any():
        bad_ids = ids[rows].unique_consecutive().tolist()  # per-position rows repeat their id
        raise CacheError(f"teacher {name} {what} for example ids {few(bad_ids)} "
                         f"({int(rows.sum())} rows); {remedy}")


def _topk(ids: torch.Tensor, values: Any, indices: Any, dtype: str, num_outputs: int,
          k: int, index_dtype: str) -> dict[str, torch.Tensor]:
    values = _rows("values", values, len(ids), k, "k")
    indices = _rows("indices", indices, len(ids), k, "k")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise CacheError(f"indices: expected an integer tensor, got {indices.dtype}")
    out_of_range = (indices < -1) | (indices >= num_outputs)
    if out_of_range.any():
        raise CacheError(f"indices: {indices[out_of_range][0].item()} is outside "
                         f"[0, num_outputs={num_outputs}) and is not -1 (padding)")
    # Padding slots may hold anything (often -inf); the loss masks them by index.
    valid = indices >= 0
    if dtype == "int8":
        stored = _quantized("top-k values", values, ids, valid)
    else:
        stored = {"values": _to_storage("top-k values", values, ids, dtype, valid=valid)}
    torch_dtype, _, pad = INDEX_DTYPES[index_dtype]
    # Every id and the sentinel fit the width (checked above): the casts never wrap.
    stored_indices = torch.where(valid, indices.long(), pad).to(torch_dtype)
    return {**stored, "indices": stored_indices.contiguous()}


def _quantized(name: str, values: torch.Tensor, ids: torch.Tensor,
               valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes with each row's offset and scale; refuses NaN/inf values, and rows whose
    float16 offset or scale would overflow."""
    if not values.dtype.is_floating_point:
        raise CacheError(f"{name}: expected a floating-point tensor, got {values.dtype}")
    _refuse_nonfinite(name, values, ids, valid, "are not finite",
                      "the teacher produced NaN or inf (check its weights and inputs)")
    stored = quantize_rows(values, valid)
    grid = torch.stack([stored["values_offset"], stored["values_scale"]], dim=1)
    _refuse_nonfinite(name, grid, ids, None, "overflow int8's float16 row offset or scale",
                      "store the cache as float32 (cache.dtype)")
    return stored


def _tail(tail: Any, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's mass off each row's slots: fp32 [rows] in [0, 1] (rounding may put a
    computed mass a hair outside; more than that is a bug of the writer)."""
    t = torch.as_tensor(tail).detach().cpu()
    if t.dim() != 1 or len(t) != len(ids) or not t.dtype.is_floating_point:
        raise CacheError(f"tail: expected a floating-point tensor [rows={len(ids)}], got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    t = t.float()
    _refuse_nonfinite("tail", t[:, None], ids, None, "is not finite",
                      "the teacher produced NaN or inf (check its weights and inputs)")
    outside = (t < -1e-4) | (t > 1 + 1e-4)
    if outside.any():
        raise CacheError(f"tail: {t[outside][0].item()} for example id "
                         f"{ids[outside][0].item()} is not a probability mass in [0, 1]")
    return t.clamp(0, 1).contiguous()


def _per_position(ids: torch.Tensor, positions: Any, empty_ids: Any) -> dict[str, torch.Tensor]:
    if positions is None:
        raise CacheError("empty_ids belongs to a per-position topk shard: give positions too")
    pos = _int_vector("positions", positions)
    if len(pos) != len(ids):
        raise CacheError(f"positions has {len(pos)} rows but example_ids has {len(ids)}")
    if len(pos) and (pos.min() < 0 or pos.max() > torch.iinfo(torch.int32).max):
        raise CacheError("positions: expected token positions in [0, 2**31)")
    runs, counts = torch.unique_consecutive(ids, return_counts=True)
    empty = _int_vector("empty_ids", [] if empty_ids is None else empty_ids)
    examples = torch.cat([runs, empty])
    _refuse_repeats(examples, "the rows of an example must be contiguous, and an example with "
                              "rows must not be in empty_ids")
    counts = torch.cat([counts, torch.zeros(len(empty), dtype=counts.dtype)])
    return {"positions": pos.to(torch.int32), "examples": examples,
            "counts": counts.to(torch.int32)}


def _refuse_repeats(ids: torch.Tensor, why: str) -> None:
    uniq, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise CacheError(f"example id {uniq[counts > 1][0].item()} appears twice in one "
                         f"shard; {why}")

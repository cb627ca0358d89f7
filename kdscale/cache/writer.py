"""Writes a teacher-logit cache: shards (each with a sidecar once finished), then the manifest.

The layout is described in `kdscale.cache.format`. In a distributed job every rank calls
`write_shard` for the shards a planner gave it, skipping those in `finished_shards`; after all
ranks are done one process calls `finalize_cache`, which writes the manifest. A rank killed at any
point leaves at worst a shard without its sidecar, which a rerun writes again. `CacheWriter` is
the single-process, streaming form of the same steps.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kdscale.cache.format import (
    DTYPES,
    MANIFEST_NAME,
    OVERWRITE,
    SHARD_RE,
    SIDECAR_RE,
    TMP_RE,
    CacheError,
    CacheManifest,
    check_settings,
    few,
    is_int,
    shard_file_name,
    shard_metadata,
    sidecar_name,
    write_bytes_atomic,
    write_json_atomic,
)
from kdscale.cache.reader import finished_shards, open_shards


def shard_tensors(example_ids: Any, logits: Any, values: Any, indices: Any, positions: Any,
                  empty_ids: Any, *, dtype: str, num_outputs: int,
                  k: int | None) -> dict[str, torch.Tensor]:
    """The tensors of a shard (layout in `kdscale.cache.format`), cast to the cache dtype;
    CacheError, before anything is written, for anything a reader or the loss could not use."""
    if (logits is None) == (values is None and indices is None):
        raise CacheError("a shard takes logits (dense), or values and indices (topk, with "
                         "positions for one row per masked position): one of the two")
    kind = "dense" if logits is not None else "topk"
    check_settings(kind, num_outputs, k, dtype, where="cache setting")
    ids = _int_vector("example_ids", example_ids)
    if kind == "dense":
        if positions is not None or empty_ids is not None:
            raise CacheError("positions and empty_ids belong to a topk shard, not a dense one")
        logits = _rows("logits", logits, len(ids), num_outputs, "num_outputs")
        out = {"logits": _to_storage("logits", logits, ids, dtype)}
    else:
        out = _topk(ids, values, indices, dtype, num_outputs, k)
    if positions is None and empty_ids is None:
        _refuse_repeats(ids, "each example is cached once (drop padded duplicates by id)")
    else:
        out |= _per_position(ids, positions, empty_ids)
    return {"example_ids": ids, **out}


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
          k: int) -> dict[str, torch.Tensor]:
    values = _rows("values", values, len(ids), k, "k")
    indices = _rows("indices", indices, len(ids), k, "k")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise CacheError(f"indices: expected an integer tensor, got {indices.dtype}")
    out_of_range = (indices < -1) | (indices >= num_outputs)
    if out_of_range.any():
        raise CacheError(f"indices: {indices[out_of_range][0].item()} is outside "
                         f"[0, num_outputs={num_outputs}) and is not -1 (padding)")
    # Padding slots may hold anything (often -inf); the loss masks them by index.
    stored = _to_storage("top-k values", values, ids, dtype, valid=indices >= 0)
    return {"values": stored, "indices": indices.to(torch.int32).contiguous()}


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


# -- writing shards ---------------------------------------------------------------------------


def write_shard(
    directory: str | os.PathLike, index: int, *, example_ids: Any, logits: Any = None,
    values: Any = None, indices: Any = None, positions: Any = None, empty_ids: Any = None,
    dtype: str, num_outputs: int, k: int | None = None, plan_id: str,
) -> dict[str, Any]:
    """Validates and writes shard `index` (atomically), then its sidecar; returns the sidecar.

    Dense: example_ids [R], logits [R, C]. Top-k: example_ids [R], values [R, k], indices [R, k]
    (-1: padding); with positions [R] one row per masked position, an example's rows contiguous,
    and empty_ids [Z] the shard's examples that have no masked position.
    """
    if not is_int(index, 0):
        raise CacheError(f"index: expected an integer >= 0, got {index!r}")
    if not (isinstance(plan_id, str) and plan_id):
        raise CacheError(f"plan_id: expected a non-empty string, got {plan_id!r}")
    tensors = shard_tensors(example_ids, logits, values, indices, positions, empty_ids,
                            dtype=dtype, num_outputs=num_outputs, k=k)
    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        raise CacheError(f"{directory} already holds a complete logit cache; {OVERWRITE}")
    directory.mkdir(parents=True, exist_ok=True)
    # A rewrite must not look finished under the old sidecar while the new file lands.
    (directory / sidecar_name(index)).unlink(missing_ok=True)
    data = safetensors.torch.save(tensors, metadata=shard_metadata(plan_id, index))
    write_bytes_atomic(directory / shard_file_name(index), data)
    examples = tensors.get("examples", tensors["example_ids"])
    sidecar = {"file": shard_file_name(index), "index": index,
               "rows": len(tensors["example_ids"]), "examples": len(examples),
               "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "plan_id": plan_id}
    write_json_atomic(directory / sidecar_name(index), sidecar)
    return sidecar


def clear_partial(directory: str | os.PathLike) -> None:
    """Removes a cache's files from `directory` (what overwrite means); other files stay."""
    directory = Path(directory)
    if directory.is_dir():
        # The manifest goes first: it must never describe shards that are half removed.
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        _remove_cache_files(directory, keep=set())


def _remove_cache_files(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        ours = (SHARD_RE.fullmatch(path.name) or SIDECAR_RE.fullmatch(path.name)
                or TMP_RE.fullmatch(path.name))
        if ours and path.name not in keep:
            path.unlink(missing_ok=True)


def finalize_cache(
    directory: str | os.PathLike, *, num_shards: int, plan_id: str, kind: str, num_outputs: int,
    k: int | None, dtype: str, teacher: dict[str, Any], tokenizer_sha256: str | None,
    data_fingerprint: str, masking: dict[str, Any] | None = None,
) -> CacheManifest:
    """Writes the manifest of shards 0..num_shards-1 (all finished), then removes the sidecars.

    Call it once, after every rank has written its shards: it removes stray temporary files.
    """
    if not is_int(num_shards, 0):
        raise CacheError(f"num_shards: expected an integer >= 0, got {num_shards!r}")
    check_settings(kind, num_outputs, k, dtype, where="cache setting")
    directory = Path(directory)
    finished = finished_shards(directory, plan_id)
    missing = [i for i in range(num_shards) if i not in finished]
    if missing:
        raise CacheError(
            f"cannot finalize the cache at {directory}: shard(s) {few(missing)} of {num_shards} "
            "are not finished (no sidecar, or a file that does not match it); rerun the cache "
            "job to write them")
    shards = [{key: finished[i][key] for key in ("file", "rows", "examples", "sha256", "bytes")}
              for i in range(num_shards)]
    manifest = CacheManifest(
        kind=kind, num_outputs=num_outputs, k=k, dtype=dtype, teacher=dict(teacher),
        num_examples=sum(s["examples"] for s in shards), num_rows=sum(s["rows"] for s in shards),
        tokenizer_sha256=tokenizer_sha256, data_fingerprint=data_fingerprint, masking=masking,
        shards=shards)
    # Headers match the settings and no id is in two shards: what the reader will check.
    open_shards(directory, manifest, remedy="the plan put it in two shards")
    write_json_atomic(directory / MANIFEST_NAME, manifest.to_dict())
    _remove_cache_files(directory, keep={s["file"] for s in shards})
    return manifest


class CacheWriter:
    """Streams rows into a cache from one process: shards 0, 1, 2... then the manifest.

    Dense: `add(example_ids [n], logits [n, C])`. Top-k: `add(example_ids [R], values=[R, k],
    indices=[R, k])`, plus `positions=[R]` (and `empty_ids`) for one row per masked position.
    Use as a context manager, or call `close()`, which writes the manifest and returns it.
    """

    def __init__(
        self, directory: str | os.PathLike, *, num_outputs: int, dtype: str = "float16",
        kind: str = "dense", k: int | None = None, shard_rows: int = 8192,
        teacher: dict[str, Any], tokenizer_sha256: str | None, data_fingerprint: str,
        masking: dict[str, Any] | None = None, overwrite: bool = False,
    ) -> None:
        self._meta = {"kind": kind, "num_outputs": num_outputs, "k": k, "dtype": dtype,
                      "teacher": dict(teacher), "tokenizer_sha256": tokenizer_sha256,
                      "data_fingerprint": data_fingerprint, "masking": masking}
        # Built now so that a bad kind/k/dtype fails before any teacher forward is spent.
        CacheManifest(**self._meta, num_examples=0, num_rows=0, shards=[])
        if not is_int(shard_rows, 1):
            raise CacheError(f"shard_rows: expected an integer >= 1, got {shard_rows!r}")
        self.directory, self.shard_rows = Path(directory), shard_rows
        text = json.dumps({**self._meta, "shard_rows": shard_rows}, sort_keys=True)
        self.plan_id = "writer-" + hashlib.sha256(text.encode()).hexdigest()[:16]
        if self.directory.exists() and not self.directory.is_dir():
            raise CacheError(f"cache path {self.directory} is a file, not a directory")
        # Overwrite clears at the first shard, so failing before it leaves the old cache whole;
        # otherwise a complete cache, or another plan's shards, are refused now.
        self._clear_first = overwrite
        if not overwrite:
            finished_shards(self.directory, self.plan_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seen: set[int] = set()
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows, self._num_shards = 0, 0
        self._closed, self._manifest = False, None

    def add(self, example_ids: Any, logits: Any = None, *, values: Any = None,
            indices: Any = None, positions: Any = None, empty_ids: Any = None) -> None:
        if self._closed:
            raise CacheError("add() after close(): this CacheWriter is closed")
        if (logits is not None) != (self._meta["kind"] == "dense"):
            raise CacheError("a dense cache takes add(example_ids, logits); a topk cache "
                             "add(example_ids, values=..., indices=..., positions=...)")
        rows = shard_tensors(example_ids, logits, values, indices, positions, empty_ids,
                             dtype=self._meta["dtype"], num_outputs=self._meta["num_outputs"],
                             k=self._meta["k"])
        if self._pending and ("positions" in rows) != ("positions" in self._pending[0]):
            raise CacheError("positions: give them with every add() of a cache, or never")
        examples = rows.get("examples", rows["example_ids"]).tolist()
        repeated = [i for i in examples if i in self._seen]
        if repeated:
            raise CacheError(f"example id {repeated[0]} was added twice; each example is cached "
                             "once (drop padded duplicates by example id before add())")
        # Recorded only after every check passed: a rejected batch leaves no trace.
        self._seen.update(examples)
        self._pending.append(rows)
        self._pending_rows += len(rows["example_ids"])
        while self._pending_rows >= self.shard_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        batch = {key: torch.cat([p[key] for p in self._pending]) for key in self._pending[0]}
        ids = batch["example_ids"]  # [R]
        # Cut at the first example boundary at or after shard_rows: an example's rows stay in
        # one shard (with one row per example, that is exactly shard_rows).
        later = torch.nonzero(ids[self.shard_rows:] != ids[self.shard_rows - 1:-1])
        cut = len(ids) if final or not len(later) else self.shard_rows + int(later[0])
        cut_examples = int((batch["counts"].cumsum(0) <= cut).sum()) if "counts" in batch else cut
        head, tail = {}, {}
        for key, t in batch.items():
            at = cut_examples if key in ("examples", "counts") else cut
            head[key], tail[key] = t[:at], t[at:]
        left = len(tail["example_ids"]) + len(tail.get("examples", ()))
        self._pending = [tail] if left else []
        self._pending_rows -= cut
        self._write(head)

    def _write(self, shard: dict[str, torch.Tensor]) -> None:
        if self._clear_first:
            clear_partial(self.directory)
            self._clear_first = False
        empty = shard["examples"][shard["counts"] == 0] if "counts" in shard else None
        write_shard(self.directory, self._num_shards, example_ids=shard["example_ids"],
                    logits=shard.get("logits"), values=shard.get("values"),
                    indices=shard.get("indices"), positions=shard.get("positions"),
                    empty_ids=empty, dtype=self._meta["dtype"],
                    num_outputs=self._meta["num_outputs"], k=self._meta["k"],
                    plan_id=self.plan_id)
        self._num_shards += 1

    def close(self) -> CacheManifest:
        """Writes the last rows, then the manifest (last); returns the manifest."""
        if self._manifest is not None:
            return self._manifest
        if self._closed:
            raise CacheError("close() after a failed write: this cache was left incomplete")
        self._closed = True  # a failure below leaves an incomplete cache, never a manifest
        while self._pending:
            self._flush(final=True)
        if self._clear_first:  # nothing was written: an empty cache replaces the old one
            clear_partial(self.directory)
        self._manifest = finalize_cache(self.directory, num_shards=self._num_shards,
                                        plan_id=self.plan_id, **self._meta)
        return self._manifest

    def abort(self) -> None:
        """Stops without a manifest: the directory stays an incomplete (not readable) cache."""
        self._closed = True
        self._pending, self._pending_rows = [], 0

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

"""Writes a teacher-logit cache: shards (each with a sidecar once finished), then the manifest.

The layout is described in `kdscale.cache.format`. In a distributed job every rank calls
`write_shard` for the shards a planner gave it, skipping those in `finished_shards`; after all
ranks are done one process calls `finalize_cache`, which writes the manifest. A rank killed at any
point leaves at worst a shard without its sidecar, which a rerun writes again. `CacheWriter` is
the single-process, streaming form of the same steps. Rows are checked in `kdscale.cache.rows`
before anything is written; sidecars are written and read in `kdscale.cache.sidecar`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kdscale.cache.format import (
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
)
from kdscale.cache.reader import open_shards
from kdscale.cache.rows import runs_then_empty, shard_tensors
from kdscale.cache.sidecar import finished_shards, remove_sidecar, write_sidecar
from kdscale.cache.sizes import narrowest_index_dtype
from kdscale.files import write_bytes_atomic, write_json_atomic


def write_shard(
    directory: str | os.PathLike, index: int, *, example_ids: Any, logits: Any = None,
    values: Any = None, indices: Any = None, positions: Any = None, empty_ids: Any = None,
    tail: Any = None, dtype: str, num_outputs: int, k: int | None = None, plan_id: str,
    index_dtype: str | None = None,
) -> dict[str, Any]:
    """Validates and writes shard `index` (atomically), then its sidecar; returns the sidecar.

    Dense: example_ids [R], logits [R, C]. Top-k: example_ids [R], values [R, k], indices [R, k]
    (-1: padding); with positions [R] one row per masked position, an example's rows contiguous,
    and empty_ids [Z] the shard's examples that have no masked position; tail [R], the
    teacher's mass off each row's slots, for a cache with a tail slot. Top-k indices are
    stored as `index_dtype` (None: the narrowest `num_outputs` needs, as `finalize_cache`).
    """
    tensors = shard_tensors(example_ids, logits, values, indices, positions, empty_ids,
                            dtype=dtype, num_outputs=num_outputs, k=k, tail=tail,
                            index_dtype=index_dtype)
    return write_shard_tensors(directory, index, tensors, plan_id=plan_id)


def write_shard_tensors(directory: str | os.PathLike, index: int,
                        tensors: dict[str, torch.Tensor], *, plan_id: str) -> dict[str, Any]:
    """Writes shard `index` from tensors `shard_tensors` (or `join_shard_tensors`) already
    checked and cast, then its sidecar; returns the sidecar."""
    if not is_int(index, 0):
        raise CacheError(f"index: expected an integer >= 0, got {index!r}")
    if not (isinstance(plan_id, str) and plan_id):
        raise CacheError(f"plan_id: expected a non-empty string, got {plan_id!r}")
    directory = Path(directory)
    if (directory / MANIFEST_NAME).is_file():
        raise CacheError(f"{directory} already holds a complete logit cache; {OVERWRITE}")
    directory.mkdir(parents=True, exist_ok=True)
    remove_sidecar(directory, index)
    data = safetensors.torch.save(tensors, metadata=shard_metadata(plan_id, index))
    examples = tensors.get("examples", tensors["example_ids"])
    try:
        write_bytes_atomic(directory / shard_file_name(index), data)
        return write_sidecar(directory, index, data, rows=len(tensors["example_ids"]),
                             examples=len(examples), plan_id=plan_id)
    except OSError as err:
        raise _write_error(f"shard {index}", directory, err) from err


def _write_error(what: str, directory: Path, err: OSError) -> CacheError:
    # A full disk, a quota or a file size limit leaves at worst a shard without its sidecar,
    # which no reader trusts: say so, rather than a bare OSError from deep inside.
    full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return CacheError(f"could not write {what} of the cache at {directory}: "
                      f"{err.strerror or err}{' (disk full or over a limit)' if full else ''}; "
                      f"the finished shards are kept: rerun the cache job once it can write")


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
    data_fingerprint: str, masking: dict[str, Any] | None = None, max_length: int | None = None,
    tail_temperature: float | None = None, audit: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None, index_dtype: str | None = None,
) -> CacheManifest:
    """Writes the manifest of shards 0..num_shards-1 (all finished), then removes the sidecars.

    Call it once, after every rank has written its shards: it removes stray temporary files.
    A topk cache records `index_dtype`, the width its shards were written with (None: the
    narrowest `num_outputs` needs, as `write_shard`).
    """
    if not is_int(num_shards, 0):
        raise CacheError(f"num_shards: expected an integer >= 0, got {num_shards!r}")
    index_dtype = resolve_index_dtype(kind, num_outputs, index_dtype)
    check_settings(kind, num_outputs, k, dtype, where="cache setting", index_dtype=index_dtype)
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
        shards=shards, max_length=max_length, tail_temperature=tail_temperature, audit=audit,
        sampling=sampling, index_dtype=index_dtype)
    # Headers match the settings and no id is in two shards: what the reader will check.
    open_shards(directory, manifest, remedy="the plan put it in two shards")
    try:
        write_json_atomic(directory / MANIFEST_NAME, manifest.to_dict())
    except OSError as err:
        raise _write_error("the manifest", directory, err) from err
    _remove_cache_files(directory, keep={s["file"] for s in shards})
    return manifest


def resolve_index_dtype(kind: str, num_outputs: int, index_dtype: str | None) -> str | None:
    """A topk cache's index width: the one asked for, or the narrowest the outputs need."""
    if kind == "dense" or index_dtype is not None:
        return index_dtype
    return narrowest_index_dtype(num_outputs) if is_int(num_outputs, 1) else None


class CacheWriter:
    """Streams rows into a cache from one process: shards 0, 1, 2... then the manifest.

    Dense: `add(example_ids [n], logits [n, C])`. Top-k: `add(example_ids [R], values=[R, k],
    indices=[R, k])`, plus `positions=[R]` (and `empty_ids`) for one row per masked position,
    and `tail=[R]` when the writer has a `tail_temperature`. Indices are stored as
    `index_dtype` (None: the narrowest `num_outputs` needs; "int32" writes the older layout).
    Use as a context manager, or call `close()`, which writes the manifest and returns it.
    """

    def __init__(
        self, directory: str | os.PathLike, *, num_outputs: int, dtype: str = "float16",
        kind: str = "dense", k: int | None = None, shard_rows: int = 8192,
        teacher: dict[str, Any], tokenizer_sha256: str | None, data_fingerprint: str,
        masking: dict[str, Any] | None = None, overwrite: bool = False,
        tail_temperature: float | None = None, index_dtype: str | None = None,
    ) -> None:
        self._meta = {"kind": kind, "num_outputs": num_outputs, "k": k, "dtype": dtype,
                      "teacher": dict(teacher), "tokenizer_sha256": tokenizer_sha256,
                      "data_fingerprint": data_fingerprint, "masking": masking,
                      "tail_temperature": tail_temperature,
                      "index_dtype": resolve_index_dtype(kind, num_outputs, index_dtype)}
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
            indices: Any = None, positions: Any = None, empty_ids: Any = None,
            tail: Any = None) -> None:
        if self._closed:
            raise CacheError("add() after close(): this CacheWriter is closed")
        if (logits is not None) != (self._meta["kind"] == "dense"):
            raise CacheError("a dense cache takes add(example_ids, logits); a topk cache "
                             "add(example_ids, values=..., indices=..., positions=...)")
        if (tail is None) != (self._meta["tail_temperature"] is None):
            raise CacheError("tail: give it with every add() of a cache with a "
                             "tail_temperature, and never to one without")
        rows = shard_tensors(example_ids, logits, values, indices, positions, empty_ids,
                             dtype=self._meta["dtype"], num_outputs=self._meta["num_outputs"],
                             k=self._meta["k"], tail=tail,
                             index_dtype=self._meta["index_dtype"])
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
        write_shard_tensors(self.directory, self._num_shards, runs_then_empty(shard),
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

"""Writes a teacher-logit cache: buffered rows -> atomic safetensors shards -> manifest last.

The layout is described in `kdscale.cache.format`. A writer owns the shards of one rank
(`shard-r<rank>-<index>.safetensors`); the manifest, written by `close()`, is what makes the
directory a complete cache, so a crashed or failed run never looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kdscale.cache.format import (
    DTYPES,
    MANIFEST_NAME,
    SHARD_RE,
    TMP_RE,
    CacheError,
    CacheManifest,
    shard_file_name,
    write_bytes_atomic,
    write_json_atomic,
)


class CacheWriter:
    """Streams (example id, logits) rows into a cache directory.

    Dense: `add(example_ids [n], logits [n, C])`. Top-k: `add(example_ids [n], values=[n, k],
    indices=[n, k])` with index -1 for padding slots. Use as a context manager, or call
    `close()`, which writes the manifest and returns it.
    """

    def __init__(
        self, directory: str | os.PathLike, *, num_outputs: int, dtype: str = "float16",
        kind: str = "dense", k: int | None = None, shard_rows: int = 8192, rank: int = 0,
        teacher: dict[str, Any], tokenizer_sha256: str | None, data_fingerprint: str,
        overwrite: bool = False,
    ) -> None:
        # Built now so that a bad kind/k/dtype fails before any teacher forward is spent.
        self._template = CacheManifest(
            kind=kind, num_outputs=num_outputs, k=k, dtype=dtype, num_examples=0,
            teacher=dict(teacher), tokenizer_sha256=tokenizer_sha256,
            data_fingerprint=data_fingerprint, shards=[],
        )
        if not (isinstance(shard_rows, int) and shard_rows >= 1):
            raise CacheError(f"shard_rows: expected an integer >= 1, got {shard_rows!r}")
        if not (isinstance(rank, int) and rank >= 0):
            raise CacheError(f"rank: expected an integer >= 0, got {rank!r}")
        self.directory = Path(directory)
        self.kind, self.num_outputs, self.k = kind, num_outputs, k
        self.shard_rows, self.rank = shard_rows, rank
        self._dtype = DTYPES[dtype][0]
        self._replace_old = self._check_directory(overwrite)
        self._seen: set[int] = set()
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._closed = False
        self._manifest: CacheManifest | None = None

    def _check_directory(self, overwrite: bool) -> bool:
        if self.directory.exists() and not self.directory.is_dir():
            raise CacheError(f"cache path {self.directory} is a file, not a directory")
        has_cache = (self.directory / MANIFEST_NAME).is_file()
        if has_cache and not overwrite:
            raise CacheError(
                f"{self.directory} already holds a complete logit cache; pass overwrite=True "
                "to replace it, or choose another directory"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        return has_cache

    # -- adding rows ---------------------------------------------------------------------------

    def add(self, example_ids: torch.Tensor, logits: torch.Tensor | None = None, *,
            values: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
        if self._closed:
            raise CacheError("add() after close(): this CacheWriter is closed")
        ids = self._check_ids(example_ids)
        if self.kind == "dense":
            if logits is None or values is not None or indices is not None:
                raise CacheError("a dense cache takes add(example_ids, logits)")
            rows = {"logits": self._check_dense(ids, logits)}
        else:
            if logits is not None or values is None or indices is None:
                raise CacheError("a topk cache takes add(example_ids, values=..., indices=...)")
            rows = self._check_topk(ids, values, indices)
        # Recorded only after every check passed: a rejected batch leaves no trace.
        self._seen.update(ids.tolist())
        self._pending.append({"example_ids": ids, **rows})
        self._pending_rows += ids.numel()
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _check_ids(self, example_ids: Any) -> torch.Tensor:
        ids = torch.as_tensor(example_ids).detach().cpu()
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise CacheError(f"example_ids: expected a 1-D integer tensor, got {ids.dtype} "
                             f"of shape {tuple(ids.shape)}")
        ids = ids.to(torch.int64)
        uniq, counts = torch.unique(ids, return_counts=True)
        repeated = uniq[counts > 1].tolist() + [i for i in ids.tolist() if i in self._seen]
        if repeated:
            raise CacheError(
                f"example id {repeated[0]} was added twice; each example is cached once "
                "(drop padded duplicates by example id before add())"
            )
        return ids

    def _check_rows(self, name: str, t: Any, n: int, width: int, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise CacheError(f"{name}: expected a 2-D tensor [n, {what}]")
        if t.shape[0] != n:
            raise CacheError(f"{name} has {t.shape[0]} rows but example_ids has {n}")
        if t.shape[1] != width:
            raise CacheError(f"{name} has {t.shape[1]} columns, expected {what}={width}")
        return t.detach().cpu()

    def _to_storage(self, name: str, x: torch.Tensor, ids: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """Casts to the cache dtype; refuses NaN/inf before and after (fp16 overflows at 65504)."""
        if not x.dtype.is_floating_point:
            raise CacheError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        stored = x.to(self._dtype).contiguous()
        for t, why in ((x, "are not finite (NaN or inf)"),
                       (stored, f"overflow {self._template.dtype}; store the cache as float32")):
            bad = ~torch.isfinite(t) if valid is None else ~torch.isfinite(t) & valid
            bad_rows = bad.any(dim=1)
            if bad_rows.any():
                first = ids[bad_rows.nonzero()[0, 0]].item()
                raise CacheError(f"{int(bad_rows.sum())} of {len(ids)} rows of {name} {why} "
                                 f"(first: example id {first})")
        return stored

    def _check_dense(self, ids: torch.Tensor, logits: Any) -> torch.Tensor:
        logits = self._check_rows("logits", logits, len(ids), self.num_outputs, "num_outputs")
        return self._to_storage("logits", logits, ids)

    def _check_topk(self, ids: torch.Tensor, values: Any, indices: Any) -> dict[str, torch.Tensor]:
        values = self._check_rows("values", values, len(ids), self.k, "k")
        indices = self._check_rows("indices", indices, len(ids), self.k, "k")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise CacheError(f"indices: expected an integer tensor, got {indices.dtype}")
        out_of_range = (indices < -1) | (indices >= self.num_outputs)
        if out_of_range.any():
            raise CacheError(f"indices: {indices[out_of_range][0].item()} is outside "
                             f"[0, num_outputs={self.num_outputs}) and is not -1 (padding)")
        # Padding slots may hold anything (often -inf); the loss masks them by index.
        stored = self._to_storage("values", values, ids, valid=indices >= 0)
        return {"values": stored, "indices": indices.to(torch.int32).contiguous()}

    # -- writing shards ------------------------------------------------------------------------

    def _flush(self, rows: int) -> None:
        batch = {key: torch.cat([p[key] for p in self._pending]) for key in self._pending[0]}
        shard = {key: t[:rows].contiguous() for key, t in batch.items()}
        rest = {key: t[rows:] for key, t in batch.items()}
        self._pending = [rest] if rest["example_ids"].numel() else []
        self._pending_rows -= rows
        self._write_shard(shard)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._replace_old:
            # New shards reuse the old names, so the old manifest would soon describe files that
            # no longer match it: drop it before the first one is replaced.
            (self.directory / MANIFEST_NAME).unlink(missing_ok=True)
            self._replace_old = False
        name = shard_file_name(self.rank, len(self._shards))
        data = safetensors.torch.save(tensors, metadata={"kdscale_cache_format": "1"})
        write_bytes_atomic(self.directory / name, data)
        self._shards.append({"file": name, "rows": int(tensors["example_ids"].numel()),
                             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})

    # -- finishing -----------------------------------------------------------------------------

    def close(self) -> CacheManifest:
        """Flushes the last rows, writes the manifest (last), removes stale shard files."""
        if self._manifest is not None:
            return self._manifest
        if self._closed:
            raise CacheError("close() after a failed write: this cache was left incomplete")
        if self._pending_rows:
            self._flush(self._pending_rows)
        manifest = dataclasses.replace(
            self._template, shards=list(self._shards),
            num_examples=sum(s["rows"] for s in self._shards),
        )
        write_json_atomic(self.directory / MANIFEST_NAME, manifest.to_dict())
        self._closed, self._manifest = True, manifest
        self._remove_stale(keep={s["file"] for s in self._shards})
        return manifest

    def _remove_stale(self, keep: set[str]) -> None:
        # Only after the new manifest is in place, and only files this format owns.
        for path in self.directory.iterdir():
            stale_shard = SHARD_RE.fullmatch(path.name) and path.name not in keep
            leftover_tmp = TMP_RE.fullmatch(path.name) and SHARD_RE.search(path.name)
            if stale_shard or leftover_tmp:
                path.unlink(missing_ok=True)

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

"""Reads a teacher-logit cache: rows gathered by example id from memory-mapped shards.

The layout is described in `kdscale.cache.format`. Opening a cache reads the manifest, checks
that every shard exists with its recorded size, parses each shard's safetensors header and
reads only the small `example_ids` tensors. Logits are never loaded whole: each tensor's data
region is mapped with `np.memmap`, so `get()` touches only the pages of the rows it returns.

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data,
with offsets relative to the first byte after the header.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdscale.cache.format import (
    DTYPES,
    CacheError,
    CacheManifest,
    CacheMismatchError,
    read_manifest,
    sha256_file,
)

# safetensors dtype code -> numpy dtype; bfloat16 has none, so it is mapped as raw uint16
_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I32": np.int32,
              "I64": np.int64}
_REBUILD = "rebuild the cache with `kdscale cache`"
MAX_OPEN_MAPS = 256


def _read_header(path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """Returns (offset of the data region, parsed header) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CacheError(f"shard {path.name}: header length {n} runs past the end of the "
                             f"file ({size} bytes); {_REBUILD}")
        try:
            return 8 + n, json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CacheError(
                f"shard {path.name}: unreadable safetensors header; {_REBUILD}") from None


class LogitCache:
    """A read-only view of a cache directory, indexed by example id."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._manifest = read_manifest(self.directory)
        self._specs = [self._open_shard(s) for s in self._manifest.shards]
        self._arrays: OrderedDict[tuple[int, str], np.memmap] = OrderedDict()  # LRU, lazy
        self._build_index()

    @property
    def manifest(self) -> CacheManifest:
        return self._manifest

    # -- opening -------------------------------------------------------------------------------

    def _expected(self, rows: int) -> dict[str, tuple[str, list[int]]]:
        m, code = self._manifest, DTYPES[self._manifest.dtype][1]
        if m.kind == "dense":
            return {"example_ids": ("I64", [rows]), "logits": (code, [rows, m.num_outputs])}
        return {"example_ids": ("I64", [rows]), "values": (code, [rows, m.k]),
                "indices": ("I32", [rows, m.k])}

    def _open_shard(self, shard: dict[str, Any]) -> dict[str, tuple]:
        """Checks a shard cheaply (size, header); returns {tensor: (path, dtype, offset, shape)}."""
        path = self.directory / shard["file"]
        if not path.is_file():
            raise CacheError(f"shard {shard['file']} listed in the manifest is missing from "
                             f"{self.directory}; {_REBUILD}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise CacheError(f"shard {shard['file']} has {size} bytes, the manifest records "
                             f"{shard['bytes']} (truncated or replaced); {_REBUILD}")
        start, header = _read_header(path, size)
        specs = {}
        for name, (code, shape) in self._expected(shard["rows"]).items():
            entry = header.get(name)
            dtype = np.dtype(_NP_DTYPES[code])
            begin, end = (entry or {}).get("data_offsets", (0, -1))
            ok = (entry is not None and entry.get("dtype") == code and entry.get("shape") == shape
                  and end - begin == dtype.itemsize * int(np.prod(shape)) and start + end <= size)
            if not ok:
                raise CacheError(f"shard {shard['file']}: tensor {name!r} is missing or is not "
                                 f"{code} {shape} ({entry}); {_REBUILD}")
            specs[name] = (path, dtype, start + begin, tuple(shape))
        return specs

    def _build_index(self) -> None:
        # One sorted id array plus each id's global row; shard and row follow from the shard
        # starts. About 16 bytes per example, against ~100 for a dict.
        ids = [np.fromfile(p, dtype=d, count=s[0], offset=o)
               for p, d, o, s in (spec["example_ids"] for spec in self._specs)]
        ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        rows = [s["rows"] for s in self._manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        repeated = np.flatnonzero(np.diff(self._sorted_ids) == 0)
        if repeated.size:
            dup = self._sorted_ids[repeated[0]]
            files = [self._manifest.shards[s]["file"] for s in self._shard_of(ids == dup)]
            raise CacheError(f"example id {dup} appears more than once (in {files}); {_REBUILD}")

    def _shard_of(self, mask: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, np.flatnonzero(mask), side="right") - 1

    def _array(self, shard: int, name: str) -> np.memmap:
        key = (shard, name)
        if key in self._arrays:
            self._arrays.move_to_end(key)
            return self._arrays[key]
        path, dtype, offset, shape = self._specs[shard][name]
        self._arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        # Each map holds a file descriptor: bound them, or a cache of thousands of shards
        # runs into the open-file limit (often 1024).
        if len(self._arrays) > MAX_OPEN_MAPS:
            self._arrays.popitem(last=False)
        return self._arrays[key]

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data; DataLoader workers reopen the maps instead.
        return {**self.__dict__, "_arrays": OrderedDict()}

    # -- lookup --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sorted_ids)

    def __contains__(self, example_id: object) -> bool:
        if not isinstance(example_id, (int, np.integer)) or isinstance(example_id, bool):
            return False
        pos = np.searchsorted(self._sorted_ids, example_id)
        return bool(pos < len(self) and self._sorted_ids[pos] == example_id)

    def example_ids(self) -> torch.Tensor:
        """All cached example ids, sorted, as int64 [num_examples]."""
        return torch.from_numpy(self._sorted_ids.copy())

    def _locate(self, example_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Maps ids [n] to (shard [n], row in shard [n]); KeyError if any id is not cached."""
        if isinstance(example_ids, torch.Tensor):
            example_ids = example_ids.detach().cpu().numpy()
        q = np.asarray(example_ids)
        if q.ndim != 1 or not (q.size == 0 or np.issubdtype(q.dtype, np.integer)):
            raise TypeError(f"example_ids: expected 1-D integers, got {q.dtype} {q.shape}")
        q = q.astype(np.int64, copy=False)
        pos = np.minimum(np.searchsorted(self._sorted_ids, q), max(len(self) - 1, 0))
        found = self._sorted_ids[pos] == q if len(self) else np.zeros(q.shape, bool)
        if not found.all():
            missing = q[~found]
            raise KeyError(f"example id {missing[0]} is not in the logit cache at "
                           f"{self.directory} ({missing.size} of {q.size} requested ids are "
                           "missing); was it built for this dataset?")
        row = self._order[pos]
        shard = np.searchsorted(self._starts, row, side="right") - 1
        return shard, row - self._starts[shard]

    def _gather(self, name: str, shard: np.ndarray, row: np.ndarray, width: int,
                dtype: np.dtype) -> torch.Tensor:
        out = np.empty((len(row), width), dtype=dtype)  # [n, width]
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            out[sel] = self._array(int(s), name)[row[sel]]  # reads only these rows' pages
        t = torch.from_numpy(out)
        bf16 = self._manifest.dtype == "bfloat16" and name != "indices"
        return t.view(torch.bfloat16) if bf16 else t

    def _value_dtype(self) -> np.dtype:
        return np.dtype(_NP_DTYPES[DTYPES[self._manifest.dtype][1]])

    def get(self, example_ids: Any) -> torch.Tensor:
        """Dense logits [n, num_outputs] in the stored dtype, in the order of `example_ids`."""
        if self._manifest.kind != "dense":
            raise CacheError("this is a topk cache: use get_topk(), not get()")
        shard, row = self._locate(example_ids)
        return self._gather("logits", shard, row, self._manifest.num_outputs, self._value_dtype())

    def get_topk(self, example_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, k] in the stored dtype, indices [n, k] int32 with -1 for padding)."""
        if self._manifest.kind != "topk":
            raise CacheError("this is a dense cache: use get(), not get_topk()")
        shard, row = self._locate(example_ids)
        k = self._manifest.k
        return (self._gather("values", shard, row, k, self._value_dtype()),
                self._gather("indices", shard, row, k, np.dtype(np.int32)))

    # -- checks --------------------------------------------------------------------------------

    def verify(self) -> None:
        """Recomputes every shard's sha256 (reads everything); raises CacheError on a mismatch."""
        bad = [s["file"] for s in self._manifest.shards
               if sha256_file(self.directory / s["file"]) != s["sha256"]]
        if bad:
            raise CacheError(f"logit cache at {self.directory}: shard(s) {', '.join(bad)} do not "
                             f"match their recorded sha256 (corrupted on disk); {_REBUILD}")

    def check_compatible(self, *, data_fingerprint: str | None = None,
                         teacher_sha256: str | None = None, tokenizer_sha256: str | None = None,
                         num_outputs: int | None = None) -> None:
        """Raises CacheMismatchError naming every given field that differs from the cache."""
        m = self._manifest
        cached = {"data_fingerprint": m.data_fingerprint,
                  "teacher_sha256": m.teacher.get("weights_sha256"),
                  "tokenizer_sha256": m.tokenizer_sha256, "num_outputs": m.num_outputs}
        expected = {"data_fingerprint": data_fingerprint, "teacher_sha256": teacher_sha256,
                    "tokenizer_sha256": tokenizer_sha256, "num_outputs": num_outputs}
        diffs = [f"  {field}: cache has {cached[field]!r}, expected {want!r}"
                 for field, want in expected.items() if want is not None and cached[field] != want]
        if diffs:
            raise CacheMismatchError(
                f"the logit cache at {self.directory} does not match the data and teacher it is "
                "used with:\n" + "\n".join(diffs) + f"\n{_REBUILD} for this data and teacher"
            )

    def __repr__(self) -> str:
        m = self._manifest
        return (f"LogitCache({str(self.directory)!r}, kind={m.kind}, examples={len(self)}, "
                f"num_outputs={m.num_outputs}, k={m.k}, dtype={m.dtype}, shards={len(m.shards)})")

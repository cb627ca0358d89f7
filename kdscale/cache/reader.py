"""Reads a teacher-logit cache: rows gathered by example id from memory-mapped shards.

The layout is described in `kdscale.cache.format`. Opening a cache reads the manifest, checks
that every shard exists with its recorded size, parses each shard's safetensors header and reads
only its small id tensors. Logits are never loaded whole: each tensor's data region is mapped
with `np.memmap`, so a lookup touches only the pages of the rows it returns. A cache still being
written has no manifest and is not readable here; `kdscale.cache.sidecar` reads its state.

Over 300 lines on purpose: one public class whose lookups share private state (the open
maps, the id index); its argument docs are a third of the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kdscale.cache.format import (
    DTYPES,
    CacheError,
    CacheManifest,
    CacheMismatchError,
    index_dtype_of,
    read_header,
    read_manifest,
)
from kdscale.cache.quantize import dequantize_rows
from kdscale.cache.sizes import INDEX_DTYPES
from kdscale.cache.verify import verify_cache

# safetensors dtype code -> numpy dtype; bfloat16 has none, so it is mapped as raw uint16
_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I32": np.int32,
              "I64": np.int64, "U16": np.uint16, "I8": np.int8}
_REBUILD = "rebuild the cache with `kdscale cache`"
MAX_OPEN_MAPS = 256
UNCHECKED = object()  # check_compatible: a field the caller does not check


class Shards(NamedTuple):
    """A cache's shards, checked but not mapped, and the ids of the examples they hold."""

    specs: list[dict[str, tuple]]  # per shard: {tensor: (path, numpy dtype, offset, shape)}
    ids: np.ndarray  # int64 [E]: every example of every shard, in shard then row order
    counts: np.ndarray | None  # int32 [E]: rows of each example; None when each has one row
    order: np.ndarray  # argsort of ids


def open_shards(directory: Path, m: CacheManifest, remedy: str = _REBUILD) -> Shards:
    """Checks every shard cheaply (size, header, ids; no id in two shards) without mapping it."""
    specs = [_open_shard(directory, m, s) for s in m.shards]
    per_position = {"positions" in spec for spec in specs}
    if len(per_position) > 1:
        raise CacheError(f"the shards of {directory} mix one row per example and one row per "
                         f"masked position; {_REBUILD}")
    key = "examples" if True in per_position else "example_ids"
    ids = [_read(spec[key]) for spec in specs]
    counts = [_read(spec["counts"]) for spec in specs] if True in per_position else None
    for shard, c in zip(m.shards, counts or [], strict=False):
        if c.min(initial=0) < 0 or int(c.sum()) != shard["rows"]:
            raise CacheError(f"shard {shard['file']}: the row counts of its examples do not add "
                             f"up to its {shard['rows']} rows; {_REBUILD}")
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    repeated = np.flatnonzero(np.diff(all_ids[order]) == 0)
    if repeated.size:
        shard_of = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
        a, b = shard_of[order[repeated[0]]], shard_of[order[repeated[0] + 1]]
        raise CacheError(f"example id {all_ids[order[repeated[0]]]} appears more than once (in "
                         f"{m.shards[a]['file']} and {m.shards[b]['file']}); {remedy}")
    return Shards(specs, all_ids, np.concatenate(counts) if counts else None, order)


def _layout(m: CacheManifest, shard: dict[str, Any],
            per_position: bool) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (safetensors dtype code, shape)} of one shard, as the manifest describes it."""
    rows, code = shard["rows"], DTYPES[m.dtype][1]
    if m.kind == "dense":
        return {"example_ids": ("I64", [rows]), "logits": (code, [rows, m.num_outputs])}
    layout = {"example_ids": ("I64", [rows]), "values": (code, [rows, m.k]),
              "indices": (INDEX_DTYPES[index_dtype_of(m)][1], [rows, m.k])}
    if m.dtype == "int8":
        layout |= {"values_offset": ("F16", [rows]), "values_scale": ("F16", [rows])}
    if per_position:
        layout |= {"positions": ("I32", [rows]), "examples": ("I64", [shard["examples"]]),
                   "counts": ("I32", [shard["examples"]])}
    if m.tail_temperature is not None:
        layout["tail"] = ("F32", [rows])
    return layout


def _open_shard(directory: Path, m: CacheManifest, shard: dict[str, Any]) -> dict[str, tuple]:
    path = directory / shard["file"]  # a bare shard name: format._validate_shard checked it
    if not path.is_file():
        raise CacheError(f"shard {shard['file']} listed in the manifest is missing from "
                         f"{directory}; {_REBUILD}")
    if not path.resolve().is_relative_to(directory.resolve()):
        # A link out of the cache would read (and map) a file the cache does not own.
        raise CacheError(f"shard {shard['file']} in {directory} is a link to "
                         f"{path.resolve()}, outside the cache directory; expected the "
                         f"shard itself. {_REBUILD}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheError(f"shard {shard['file']} has {size} bytes, the manifest records "
                         f"{shard['bytes']} (truncated or replaced); {_REBUILD}")
    start, header = read_header(path, size)
    per_position = m.kind == "topk" and "positions" in header
    if not per_position and shard["examples"] != shard["rows"]:
        raise CacheError(f"shard {shard['file']} holds one row per example, but the manifest "
                         f"records {shard['examples']} examples in {shard['rows']} rows; "
                         f"{_REBUILD}")
    specs = {}
    for name, (code, shape) in _layout(m, shard, per_position).items():
        entry = header.get(name)
        dtype = np.dtype(_NP_DTYPES[code])
        begin, end = (entry or {}).get("data_offsets", (0, -1))
        ok = (entry is not None and entry.get("dtype") == code and entry.get("shape") == shape
              and end - begin == dtype.itemsize * int(np.prod(shape)) and start + end <= size)
        if not ok:
            raise CacheError(f"shard {shard['file']}: tensor {name!r} is missing or is not "
                             f"{code} {shape} ({entry}){_why(m, name)}; {_REBUILD}")
        specs[name] = (path, dtype, start + begin, tuple(shape))
    return specs


def _why(m: CacheManifest, name: str) -> str:
    """What in the manifest decides a tensor's dtype, for the refusal of a shard that differs."""
    if name == "indices":
        return f", as the manifest's index_dtype {index_dtype_of(m)!r} says"
    if name.startswith("values") or name == "logits":
        return f", as the manifest's dtype {m.dtype!r} says"
    return ""


def _read(spec: tuple) -> np.ndarray:
    path, dtype, offset, shape = spec
    return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset)


@dataclasses.dataclass
class TopK:
    """The top-k rows of some examples, concatenated in request order."""

    values: torch.Tensor  # [R, k] in the stored dtype; float32 from an int8 cache's codes
    indices: torch.Tensor  # [R, k] int64 (what torch.gather takes); -1 marks a padding slot
    positions: torch.Tensor | None  # [R] int64 token position of each row; None: one row each
    counts: torch.Tensor  # [n] int64 rows of each requested id (all 1 without positions)
    # [R] float32: the teacher's mass off each row's slots, at the manifest's
    # tail_temperature; None for a cache without a tail slot.
    tail: torch.Tensor | None = None


class LogitCache:
    """A read-only view of a cache written by `kdscale cache`, indexed by example id.

    Opening reads the manifest and the shards' headers and id tensors, and checks that every
    shard is there with its recorded size; teacher values are memory-mapped and read only
    for the rows asked for. `verify` reads every byte against the manifest.

    Args:
        directory: the cache folder (its `manifest.json` and `shard-NNNNN.safetensors`).

    Raises:
        CacheError: no cache there, or a manifest or shard that does not match its record.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._manifest = read_manifest(self.directory)
        shards = open_shards(self.directory, self._manifest)
        self._specs = shards.specs
        self._arrays: OrderedDict[tuple[int, str], np.memmap] = OrderedDict()  # LRU, lazy
        # Sorted ids, each example's first global row and (per position) its row count: 16
        # bytes per example (20 per position), against ~100 for a dict.
        self._sorted_ids = shards.ids[shards.order]
        counts = shards.counts
        first = np.arange(len(shards.ids)) if counts is None else np.cumsum(counts) - counts
        self._first = first.astype(np.int64)[shards.order]
        self._counts = None if counts is None else counts[shards.order]
        # Each tensor's numpy dtype, from the layout every shard was checked against.
        layout = _layout(self._manifest, {"rows": 0, "examples": 0}, self.per_position)
        self._dtypes = {name: np.dtype(_NP_DTYPES[code]) for name, (code, _) in layout.items()}
        rows = [s["rows"] for s in self._manifest.shards]
        self._starts = np.cumsum([0] + rows[:-1], dtype=np.int64)  # global row of each shard

    @property
    def manifest(self) -> CacheManifest:
        """What the cache holds and was built from (kind, dtype, teacher, data, shards)."""
        return self._manifest

    @property
    def per_position(self) -> bool:
        """True for a top-k cache with one row per masked position (and TopK.positions)."""
        return self._counts is not None

    def _array(self, shard: int, name: str) -> np.memmap:
        key = (shard, name)
        if key in self._arrays:
            self._arrays.move_to_end(key)
            return self._arrays[key]
        path, dtype, offset, shape = self._specs[shard][name]
        self._arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        # Each map holds a file descriptor: bound them, or a cache of thousands of shards
        # runs into the open-file limit (often 1024).
        while len(self._arrays) > MAX_OPEN_MAPS:
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

    def _locate(self, example_ids: Any) -> np.ndarray:
        """Maps ids [n] to their places in the index [n]; KeyError if any id is not cached."""
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
        return pos

    def _gather(self, name: str, rows: np.ndarray, width: tuple[int, ...]) -> np.ndarray:
        """Global rows [R] of one tensor -> [R, *width] as stored, reading only those rows'
        pages."""
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[shard]
        out = np.empty((len(rows), *width), dtype=self._dtypes[name])
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            out[sel] = self._array(int(s), name)[local[sel]]
        return out

    def _values(self, name: str, rows: np.ndarray, width: int) -> torch.Tensor:
        """Teacher logits or top-k values of some rows: the stored dtype, or float32
        dequantized from an int8 cache's codes (kdscale.cache.quantize)."""
        stored = torch.from_numpy(self._gather(name, rows, (width,)))
        if self._manifest.dtype == "int8":
            offset, scale = (torch.from_numpy(self._gather(grid, rows, ()))
                             for grid in ("values_offset", "values_scale"))
            return dequantize_rows(stored, offset, scale)
        return stored.view(torch.bfloat16) if self._manifest.dtype == "bfloat16" else stored

    def _indices(self, rows: np.ndarray) -> torch.Tensor:
        """Top-k indices of some rows as int64 (what torch.gather takes), -1 at padding,
        whatever width they are stored in."""
        stored = self._gather("indices", rows, (self._manifest.k,))
        pad = INDEX_DTYPES[index_dtype_of(self._manifest)][2]
        return torch.from_numpy(np.where(stored == pad, -1, stored.astype(np.int64)))

    def get(self, example_ids: Any) -> torch.Tensor:
        """The teacher's logits of some examples, from a dense cache.

        Args:
            example_ids: 1-D integer ids [n] (a tensor, array or list).

        Returns:
            Logits [n, num_outputs] in the stored dtype, in the order of `example_ids`.

        Raises:
            CacheError: the cache is top-k (use `get_topk`).
            KeyError: an id that is not in the cache.
        """
        if self._manifest.kind != "dense":
            raise CacheError("this is a topk cache: use get_topk(), not get()")
        rows = self._first[self._locate(example_ids)]
        return self._values("logits", rows, self._manifest.num_outputs)

    def get_topk(self, example_ids: Any) -> TopK:
        """The teacher's top-k rows of some examples, from a top-k cache.

        Args:
            example_ids: 1-D integer ids [n] (a tensor, array or list).

        Returns:
            A `TopK`: the examples' rows concatenated in the order of `example_ids`, with
            each example's row count (and, per position, each row's token position).

        Raises:
            CacheError: the cache is dense (use `get`).
            KeyError: an id that is not in the cache.
        """
        if self._manifest.kind != "topk":
            raise CacheError("this is a dense cache: use get(), not get_topk()")
        pos, k = self._locate(example_ids), self._manifest.k
        if self._counts is None:
            rows, counts = self._first[pos], np.ones(len(pos), np.int64)
        else:
            counts = self._counts[pos].astype(np.int64)
            # Row j of example i is first[i] + j: expand each example's range of rows.
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            rows = np.repeat(self._first[pos], counts) + within
        positions = (torch.from_numpy(self._gather("positions", rows, ())).long()
                     if self.per_position else None)
        tail = (torch.from_numpy(self._gather("tail", rows, ()))
                if self._manifest.tail_temperature else None)
        return TopK(values=self._values("values", rows, k), indices=self._indices(rows),
                    positions=positions, counts=torch.from_numpy(counts), tail=tail)

    # -- checks --------------------------------------------------------------------------------

    def verify(self, echo=None, skip_with: str = "set cache.verify false") -> None:
        """Reads every shard: its sha256 against the manifest's, and finite values.

        Args:
            echo: called with one line saying what was read and how long it took; None: quiet.
            skip_with: the setting that skips this check, as the error names it.

        Raises:
            CacheError: naming each damaged shard and the command that rewrites it.
        """
        verify_cache(self.directory, self._manifest, echo=echo or (lambda line: None),
                     skip_with=skip_with)

    def check_compatible(self, *, data_fingerprint: str | None = None,
                         teacher_sha256: str | None = None, tokenizer_sha256: str | None = None,
                         num_outputs: int | None = None,
                         masking: dict[str, Any] | None | object = UNCHECKED) -> None:
        """Check that the cache was built from this data, teacher and tokenizer.

        A field left None is not checked; `masking` is checked unless it is left out.

        Args:
            data_fingerprint: the fingerprint of the rows the cache is used with.
            teacher_sha256: the hash of the teacher's weights.
            tokenizer_sha256: the hash of the tokenizer.
            num_outputs: the logits per row (classes, or vocabulary size).
            masking: the data's recipe of random draws, or None for data without masks or
                augmented copies (so a cache that has a recipe is refused).

        Raises:
            CacheMismatchError: naming every given field that differs from the cache.
        """
        m = self._manifest
        cached = {"data_fingerprint": m.data_fingerprint,
                  "teacher_sha256": m.teacher.get("weights_sha256"),
                  "tokenizer_sha256": m.tokenizer_sha256, "num_outputs": m.num_outputs,
                  "masking": m.masking}
        expected = {"data_fingerprint": data_fingerprint, "teacher_sha256": teacher_sha256,
                    "tokenizer_sha256": tokenizer_sha256, "num_outputs": num_outputs}
        expected = {field: want for field, want in expected.items() if want is not None}
        if masking is not UNCHECKED:
            expected["masking"] = masking
        diffs = [f"  {field}: cache has {cached[field]!r}, expected {want!r}"
                 for field, want in expected.items() if cached[field] != want]
        if diffs:
            raise CacheMismatchError(
                f"the logit cache at {self.directory} does not match the data and teacher it is "
                "used with:\n" + "\n".join(diffs) + f"\n{_REBUILD} for this data and teacher"
            )

    def check_temperature(self, temperature: float | dict) -> None:
        """A cache with a tail slot, or of drawn tokens, holds one temperature's distribution:
        refuse another, or a schedule (raw logits serve any).

        Raises:
            CacheMismatchError: naming loss.temperature and the cache's tail temperature.
        """
        m = self._manifest
        what, cached = ("tails", m.tail_temperature) if m.sampling is None else \
            ("tokens drawn", m.sampling["temperature"])
        if cached is None or (not isinstance(temperature, dict) and temperature == cached):
            return
        raise CacheMismatchError(
            f"the logit cache at {self.directory} holds {what} at temperature {cached:g}, and "
            f"loss.temperature is {temperature!r}: distill at {cached:g}, or rebuild the cache "
            f"with `kdscale cache` at this temperature")

    def __repr__(self) -> str:
        m = self._manifest
        return (f"LogitCache({str(self.directory)!r}, kind={m.kind}, examples={len(self)}, "
                f"rows={m.num_rows}, num_outputs={m.num_outputs}, k={m.k}, dtype={m.dtype}, "
                f"shards={len(m.shards)})")

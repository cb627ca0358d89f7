"""Checking a complete cache against its manifest before it is trusted: every shard there, of
its recorded size and sha256, holding only finite teacher values. `kdscale distill` runs it
before the first step (`cache.verify`), and `kdscale cache` before it says a cache is complete:
the damaged shards are then rewritten, and only those (see `reopen_for_repair`).

The cost is one read of every byte; benchmarks/cache measures it per GiB.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kdscale.cache.format import MANIFEST_NAME, CacheError, CacheManifest, read_header
from kdscale.cache.sidecar import restore_sidecar
from kdscale.files import sha256_file

# What the teacher wrote, as floats; ids and positions are checked when the cache is opened,
# and an int8 cache's values are codes (never NaN), whose row offsets and scales are floats.
VALUE_TENSORS = ("logits", "values", "tail", "values_offset", "values_scale")
# A float is NaN or infinite exactly when its exponent bits are all ones: checked on the raw
# bits (one pass, no conversion), per safetensors dtype: (unsigned view, exponent mask).
EXPONENT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                 "F32": (np.uint32, 0x7F800000)}
CHUNK = 1 << 22  # elements checked at a time


def _all_finite(path: Path, size: int) -> bool:
    start, header = read_header(path, size)
    for name in VALUE_TENSORS:
        entry = header.get(name)
        if entry is None or entry["dtype"] == "I8":
            continue
        kind, mask = EXPONENT_BITS[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // np.dtype(kind).itemsize
        if count == 0:
            continue
        bits = np.memmap(path, dtype=kind, mode="r", offset=start + begin, shape=(count,))
        for i in range(0, count, CHUNK):
            if np.any((bits[i:i + CHUNK] & mask) == mask):
                return False
    return True


def damaged_shards(directory: Path, manifest: CacheManifest) -> dict[int, str]:
    """{shard index: what is wrong with it}, empty when every shard is whole."""
    damaged = {}
    for index, shard in enumerate(manifest.shards):
        problem = _shard_problem(directory / shard["file"], shard)
        if problem:
            damaged[index] = problem
    return damaged


def _shard_problem(path: Path, shard: dict) -> str | None:
    if not path.is_file() or path.is_symlink():
        return "missing"
    if path.stat().st_size != shard["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest records {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        return "its bytes differ from the manifest's sha256"
    try:
        if not _all_finite(path, shard["bytes"]):
            return "it holds NaN or infinite teacher values"
    except (CacheError, KeyError, ValueError, OSError) as err:
        return f"unreadable ({err})"
    return None


def verify_cache(directory: Path, manifest: CacheManifest, echo=print,
                 skip_with: str = "set cache.verify false") -> None:
    """Raise a CacheError naming every damaged shard and the command that repairs it (and
    `skip_with`, the setting that skips this check where it runs); print what was read and how
    long it took."""
    start = time.perf_counter()
    damaged = damaged_shards(directory, manifest)
    size = sum(s["bytes"] for s in manifest.shards)
    if damaged:
        shown = "; ".join(f"{manifest.shards[i]['file']}: {why}" for i, why in damaged.items())
        raise CacheError(f"cache {directory}: {len(damaged)} damaged shard(s) ({shown}). "
                         f"`kdscale cache` with this config rewrites just those (or "
                         f"{skip_with} to skip this check)")
    echo(f"cache {directory} verified: {len(manifest.shards)} shards, {size / 2**20:.1f} MiB "
         f"in {time.perf_counter() - start:.2f} s")


def reopen_for_repair(directory: Path, manifest: CacheManifest, damaged: dict[int, str],
                      plan_id: str) -> None:
    """Turn a complete cache with damaged shards back into a partial one that a rerun
    finishes: the whole shards are marked finished (sidecars from the manifest's records),
    the damaged ones removed, then the manifest. The cache job then writes only those."""
    for index, shard in enumerate(manifest.shards):
        if index in damaged:
            (directory / shard["file"]).unlink(missing_ok=True)
        else:
            restore_sidecar(directory, index, shard, plan_id)
    (directory / MANIFEST_NAME).unlink()  # last: until then the cache reads as complete

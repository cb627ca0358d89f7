"""Checking a complete cache against its manifest before it is trusted: every shard there, of
its recorded size and sha256, holding only finite teacher values. `kdscale distill` runs it
before the first step (`cache.verify`), and `kdscale cache` before it says a cache is complete:
the damaged shards are then rewritten, and only those (see `reopen_for_repair`).

The cost is one read of every byte; benchmarks/cache measures it per GiB.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kdscale.cache.format import MANIFEST_NAME, CacheError, CacheManifest
from kdscale.cache.sidecar import restore_sidecar
from kdscale.files import sha256_file

VALUE_TENSORS = ("logits", "values")  # what the teacher wrote; ids and positions are checked
# when the cache is opened


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
        with safe_open(str(path), framework="pt") as f:
            for name in VALUE_TENSORS:
                if name in f.keys() and not torch.isfinite(f.get_tensor(name)).all():
                    return "it holds NaN or infinite teacher values"
    except (SafetensorError, OSError) as err:
        return f"unreadable ({err})"
    return None


def verify_cache(directory: Path, manifest: CacheManifest, echo=print) -> None:
    """Raise a CacheError naming every damaged shard and the command that repairs it; print
    what was read and how long it took."""
    start = time.perf_counter()
    damaged = damaged_shards(directory, manifest)
    size = sum(s["bytes"] for s in manifest.shards)
    if damaged:
        shown = "; ".join(f"{manifest.shards[i]['file']}: {why}" for i, why in damaged.items())
        raise CacheError(f"cache {directory}: {len(damaged)} damaged shard(s) ({shown}). "
                         f"`kdscale cache` with this config rewrites just those (or set "
                         f"cache.verify false to skip this check)")
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

"""Where and how a cache is built beside what it replaces: one job per cache folder (a lock
beside it), a folder beside the cache for a replacement, and the swap that puts a finished
replacement in the cache's place; and whether a shard fits in memory while it is built."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kdscale.cache.format import CacheError


@contextmanager
def build_lock(cache_dir: Path, state):
    """One `kdscale cache` at a time per cache folder: a second one stops at once, naming the
    first, rather than doing all the work again and failing at the end. The main process
    holds an exclusive lock on a file beside the cache (removed when done)."""
    lock = cache_dir.parent / f".{cache_dir.name}.lock"
    handle, holder = _take_lock(lock) if state.is_main_process else (None, None)
    if max_over_processes(int(holder is not None), state):
        raise CacheError(f"cache {cache_dir} is being built by another `kdscale cache` "
                         f"({holder or 'see the main process'}); wait for it to finish, or "
                         f"choose another --cache.dir")
    try:
        yield
    finally:
        if handle is not None:
            lock.unlink(missing_ok=True)
            handle.close()  # closing releases the lock


def _take_lock(lock: Path):
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+")  # noqa: SIM115 - held open for the whole build
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "its process is unknown"
        handle.close()
        return None, holder
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None


def staging_dir(cache_dir: Path) -> Path:
    """Beside the cache, named from it: a rerun after a crash finds its finished shards."""
    return cache_dir.parent / f".{cache_dir.name}.building"


def swap_in(new: Path, cache_dir: Path) -> None:
    """The finished cache takes the old one's place; the old one is removed only then."""
    old = cache_dir.parent / f".{cache_dir.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(cache_dir, old)
    os.replace(new, cache_dir)
    shutil.rmtree(old, ignore_errors=True)


def max_over_processes(value: int, state) -> int:
    if state.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=state.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


# A shard is held as its batches' stored rows while it fills; at its write, as one joined
# copy (the batches freed) and the serialized bytes of it.
SHARD_COPIES = 2


def check_shard_fits(batch: dict[str, torch.Tensor], shard_rows: int, shard_examples: int,
                     processes: int, available: int) -> None:
    """CacheError, after the first batch, when the largest shard (`shard_rows` cached rows of
    `shard_examples` examples) would not fit in this process's share of the machine's free
    memory, at the bytes a row of `batch` (stored rows) takes."""
    per_row = sum(t.numel() * t.element_size() for t in batch.values()) / len(
        batch["example_ids"])
    need = per_row * shard_rows * SHARD_COPIES
    share = available / processes
    if need > share:
        fits = max(int(shard_examples * share / need), 1)
        raise CacheError(
            f"cache.shard_rows: a shard of {shard_examples:,} examples ({shard_rows:,} cached "
            f"rows of {per_row / 2**10:,.1f} KiB) would take about {need / 2**30:.1f} GiB of "
            f"memory while it is written (held {SHARD_COPIES} times at its peak), more than "
            f"the {share / 2**30:.1f} GiB free for each of this machine's {processes} "
            f"process(es); set cache.shard_rows to {fits:,} or fewer")

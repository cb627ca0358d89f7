"""The sidecars of a cache being written: which shards are finished, so a rerun can resume.

A shard is finished once its sidecar `shard-00000.json` is written after it (layout in
`kdscale.cache.format`). `write_shard` removes a shard's sidecar before it rewrites the shard and
writes it again after; `finished_shards` trusts a sidecar only when the file beside it has the
size it records, and refuses a directory that holds another plan's shards. `finalize_cache` copies
the sidecars into the manifest and removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdscale.cache.format import (
    MANIFEST_NAME,
    OVERWRITE,
    SIDECAR_RE,
    CacheError,
    shard_file_name,
    shard_index,
    shard_plan_id,
    sidecar_name,
)
from kdscale.files import write_json_atomic

_SIDECAR_KEYS = ("file", "index", "rows", "examples", "sha256", "bytes", "plan_id")


def remove_sidecar(directory: Path, index: int) -> None:
    """Marks shard `index` unfinished before it is rewritten: a rewrite must not look finished
    under the old sidecar while the new file lands."""
    (directory / sidecar_name(index)).unlink(missing_ok=True)


def write_sidecar(directory: Path, index: int, data: bytes, *, rows: int, examples: int,
                  plan_id: str) -> dict[str, Any]:
    """Marks shard `index`, already written with the bytes `data`, finished; returns the sidecar."""
    sidecar = {"file": shard_file_name(index), "index": index, "rows": rows,
               "examples": examples, "sha256": hashlib.sha256(data).hexdigest(),
               "bytes": len(data), "plan_id": plan_id}
    write_json_atomic(directory / sidecar_name(index), sidecar)
    return sidecar


def restore_sidecar(directory: Path, index: int, shard: dict[str, Any], plan_id: str) -> None:
    """Marks shard `index` of a complete cache finished again, from its manifest record (a
    repair reopens the cache; see `kdscale.cache.verify`)."""
    sidecar = {key: shard[key] for key in ("file", "rows", "examples", "sha256", "bytes")}
    write_json_atomic(directory / sidecar_name(index), sidecar | {"index": index,
                                                                   "plan_id": plan_id})


def finished_shards(directory: str | os.PathLike, plan_id: str) -> dict[int, dict[str, Any]]:
    """{index: sidecar} of this plan's finished shards: sidecar present, file of its size.

    Raises CacheError when the directory holds a complete cache, or shards of another plan: a
    rerun must never mix its shards with those of other data, another teacher or other settings.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    if (directory / MANIFEST_NAME).is_file():
        raise CacheError(f"{directory} already holds a complete logit cache; {OVERWRITE}")
    finished, foreign = {}, []
    for path in sorted(directory.iterdir()):
        if (i := shard_index(path.name, SIDECAR_RE)) is not None:
            sidecar = _read_sidecar(path)
            if sidecar is not None and sidecar["plan_id"] != plan_id:
                foreign.append(path.name)
            elif sidecar is not None and _matches_file(directory, i, sidecar):
                finished[i] = sidecar
        elif (i := shard_index(path.name)) is not None:
            # A shard without a sidecar is unfinished if it is ours; its header says whose it is.
            if not (directory / sidecar_name(i)).exists() and shard_plan_id(path) != plan_id:
                foreign.append(path.name)
    if foreign:
        raise CacheError(
            f"{directory} holds a partial cache of a different plan (different data, teacher "
            f"or settings), e.g. {', '.join(foreign[:3])}; {OVERWRITE}")
    return finished


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    # Sidecars are written atomically, so an unreadable one is debris: it marks nothing finished.
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(sidecar, dict) and all(key in sidecar for key in _SIDECAR_KEYS)
    return sidecar if ok and isinstance(sidecar["plan_id"], str) else None


def _matches_file(directory: Path, index: int, sidecar: dict[str, Any]) -> bool:
    path = directory / shard_file_name(index)
    return (sidecar["file"] == path.name and sidecar["index"] == index and path.is_file()
            and path.stat().st_size == sidecar["bytes"])

"""Durable writes and checksums: what every output of kdscale (cache shards and manifests,
checkpoint states, saved models, reports) is written with.

A file is written under a temporary name in its final directory, fsynced, then renamed over its
final name, so a crash, a full disk or Ctrl-C never leaves a half-written file under a final
name, and the previous file stays whole until the new one is complete (the cache's temporary
names are `kdscale.cache.format.TMP_RE`, which `clear_partial` and `finalize_cache` sweep away).
A directory (a saved model) is built beside its final name and swapped in the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdscale.errors import KdscaleError


class OutputError(KdscaleError, OSError):
    """An output could not be written (full disk, read-only folder); the previous one is kept."""


def check_writable(directory: str | os.PathLike, key: str) -> None:
    """Fail at start, naming the key, rather than after the work: a file is written and
    removed in the folder, or in its nearest existing parent (nothing is left behind)."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{key}: {existing} is a file; expected a folder for {directory}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".kdscale-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"{key}: cannot write in {existing} ({reason}); expected a "
                          f"writable folder for {directory}") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; a cache is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Several files that belong together (a report's JSON and Markdown): all are written
    under temporary names first, then renamed, so a failed write replaces none of them."""
    staged = {}
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged[path] = Path(tmp)
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for path in files}:
        _fsync_dir(directory)


def replace_directory(target: Path, build: Callable[[Path], None]) -> None:
    """`build(folder)` fills a new folder beside `target`, which then takes its place: until
    the build is complete the previous `target` is untouched, and a failed build (full disk,
    read-only folder, Ctrl-C) leaves it whole and removes what it wrote."""
    target.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    try:
        build(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)  # two renames: the only moment without `target`
    os.replace(new, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)

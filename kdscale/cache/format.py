"""On-disk format of the teacher-logit cache, version 1.

A cache is one directory:

    <dir>/
      manifest.json                        written last: its presence is what "complete" means
      shard-r00000-00000.safetensors       rank 0, shard 0
      shard-r00000-00001.safetensors       rank 0, shard 1
      shard-r00001-00000.safetensors       rank 1, shard 0 (each rank writes only its own shards)

Each shard is a plain safetensors file holding `rows` examples, keyed by stable example id:

    dense:  example_ids int64 [rows]   logits <dtype> [rows, num_outputs]
    topk:   example_ids int64 [rows]   values <dtype> [rows, k]   indices int32 [rows, k]
            (an index of -1 marks a padding slot)

Raw logits are stored; the temperature is chosen at distill time. The manifest records what the
logits were computed from (teacher, tokenizer, data fingerprint), so that a reader can refuse a
cache that does not match, and every shard's file name, row count, byte size and sha256.

Every file is written under a temporary name in the same directory, fsynced, then renamed over
its final name, so a crash never leaves a half-written file under a final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdscale import __version__
from kdscale.errors import KdscaleError

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("dense", "topk")
# manifest dtype name -> (torch dtype, safetensors dtype code)
DTYPES = {
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
}
# The pattern doubles as a path-traversal guard: a manifest can only name files in its directory.
SHARD_RE = re.compile(r"shard-r\d{5}-\d{5}\.safetensors")
TMP_RE = re.compile(r"\..+\.tmp")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild it with `kdscale cache`"


class CacheError(KdscaleError):
    """A logit cache is missing, damaged, or cannot be written as asked."""


class CacheMismatchError(CacheError):
    """A logit cache was built for other data, another teacher or another tokenizer."""


def shard_file_name(rank: int, index: int) -> str:
    return f"shard-r{rank:05d}-{index:05d}.safetensors"


@dataclasses.dataclass(kw_only=True)
class CacheManifest:
    format_version: int = CACHE_FORMAT_VERSION
    kind: str  # "dense" | "topk"
    num_outputs: int  # classes (dense) or vocabulary size (topk)
    k: int | None  # slots per row for topk; None for dense
    dtype: str  # dtype of logits / values: "float16" | "float32" | "bfloat16"
    num_examples: int
    teacher: dict[str, Any]  # e.g. {"name": ..., "weights_sha256": ...}
    tokenizer_sha256: str | None
    data_fingerprint: str
    shards: list[dict[str, Any]]  # {"file", "rows", "sha256", "bytes"}, in write order
    kdscale_version: str = __version__

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: Any) -> CacheManifest:
        if not isinstance(raw, dict):
            raise CacheError(f"manifest: expected a JSON object, got {type(raw).__name__}")
        # The version is checked first: another version's fields may mean other things.
        version = raw.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise CacheError(
                f"manifest field 'format_version': expected {CACHE_FORMAT_VERSION}, got "
                f"{version!r} (written by kdscale {raw.get('kdscale_version', '?')}, read by "
                f"kdscale {__version__}); {_REBUILD} or use a matching kdscale"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in raw]
        if missing:
            raise CacheError(f"manifest is missing field(s) {', '.join(map(repr, missing))}")
        # Unknown keys are ignored, so a later v1 writer may add optional fields.
        return cls(**{n: raw[n] for n in names})

    @classmethod
    def from_json(cls, text: str) -> CacheManifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"manifest is not valid JSON ({e}); {_REBUILD}") from None
        return cls.from_dict(raw)


def _check(ok: bool, field: str, expected: str, got: Any) -> None:
    if not ok:
        raise CacheError(f"manifest field {field!r}: expected {expected}, got {got!r}")


def _is_int(x: Any, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _validate(m: CacheManifest) -> None:
    _check(m.format_version == CACHE_FORMAT_VERSION, "format_version",
           str(CACHE_FORMAT_VERSION), m.format_version)
    _check(m.kind in KINDS, "kind", "'dense' or 'topk'", m.kind)
    _check(_is_int(m.num_outputs, 1), "num_outputs", "an integer >= 1", m.num_outputs)
    if m.kind == "dense":
        _check(m.k is None, "k", "null for a dense cache", m.k)
    else:
        _check(_is_int(m.k, 1) and m.k <= m.num_outputs, "k",
               f"an integer in [1, num_outputs={m.num_outputs}] for a topk cache", m.k)
    _check(m.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}", m.dtype)
    _check(isinstance(m.teacher, dict), "teacher", "an object", m.teacher)
    _check(m.tokenizer_sha256 is None or isinstance(m.tokenizer_sha256, str),
           "tokenizer_sha256", "a string or null", m.tokenizer_sha256)
    _check(isinstance(m.data_fingerprint, str), "data_fingerprint", "a string",
           m.data_fingerprint)
    _check(isinstance(m.kdscale_version, str), "kdscale_version", "a string", m.kdscale_version)
    _check(isinstance(m.shards, list), "shards", "a list", m.shards)
    for i, shard in enumerate(m.shards):
        _validate_shard(f"shards[{i}]", shard)
    files = [s["file"] for s in m.shards]
    _check(len(set(files)) == len(files), "shards", "distinct file names", files)
    total = sum(s["rows"] for s in m.shards)
    _check(m.num_examples == total, "num_examples",
           f"{total} (the sum of the shards' rows)", m.num_examples)


def _validate_shard(field: str, shard: Any) -> None:
    keys = {"file", "rows", "sha256", "bytes"}
    _check(isinstance(shard, dict) and keys <= shard.keys(), field,
           f"an object with keys {sorted(keys)}", shard)
    _check(isinstance(shard["file"], str) and SHARD_RE.fullmatch(shard["file"]) is not None,
           f"{field}.file", "a name like 'shard-r00000-00000.safetensors'", shard["file"])
    _check(_is_int(shard["rows"], 1), f"{field}.rows", "an integer >= 1", shard["rows"])
    _check(_is_int(shard["bytes"], 8), f"{field}.bytes", "an integer >= 8", shard["bytes"])
    _check(isinstance(shard["sha256"], str) and _SHA256_RE.fullmatch(shard["sha256"]) is not None,
           f"{field}.sha256", "64 lowercase hex digits", shard["sha256"])


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


def read_manifest(directory: str | os.PathLike) -> CacheManifest:
    directory = Path(directory)
    if not directory.exists():
        raise CacheError(f"cache directory {directory} does not exist")
    if not directory.is_dir():
        raise CacheError(f"cache path {directory} is a file, not a cache directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(
            f"{directory} is not a kdscale logit cache (no {MANIFEST_NAME}); "
            "run `kdscale cache` to create one"
        )
    try:
        return CacheManifest.from_json(path.read_text())
    except CacheError as e:
        raise CacheError(f"{path}: {e}") from None

"""On-disk format of the teacher-logit cache, version 1.

A cache is one directory:

    <dir>/
      manifest.json             written last: its presence is what "complete" means
      shard-00000.safetensors   shards are numbered globally, whatever the world size: a planner
      shard-00001.safetensors   decides which example ids go in shard i and which rank writes it

Each shard is a plain safetensors file holding `rows` rows, keyed by stable example id:

    dense:  example_ids int64 [rows]   logits <dtype> [rows, num_outputs]
    topk:   example_ids int64 [rows]   values <dtype> [rows, k]   indices <index_dtype> [rows, k]
            index_dtype (manifest) is the narrowest of uint16 (vocabularies of up to 65,535
            outputs; 65535 marks a padding slot) and int32 (-1 marks a padding slot); a
            manifest without it (written before it existed) holds int32 indices
    topk, dtype int8 (8-bit values, `kdscale.cache.quantize`), as topk plus:
            values int8 [rows, k]      codes on a per-row grid (-128: a padding slot)
            values_offset float16 [rows], values_scale float16 [rows]
                                       value = offset + scale * code, within scale / 2
    topk, one row per masked position (masked-LM caches), as topk plus:
            positions int32 [rows]     the token position of each row
            examples int64 [E]         every example of the shard, in row order, and
            counts int32 [E]           its number of rows (0: no masked position)
            An example's rows are contiguous and in one shard; example_ids repeats its id.
    topk with a tail slot (manifest tail_temperature T), as topk plus:
            tail float32 [rows]        the teacher's probability mass outside the row's k
                                       slots at temperature T, from the full distribution

While a cache is being written, a shard is finished once its sidecar `shard-00000.json`
({"file", "index", "rows", "examples", "sha256", "bytes", "plan_id"}) is written after it: a
resumed run trusts the sidecar, never a bare shard. `finalize_cache` copies the sidecars into the
manifest and removes them. The plan id names the data, teacher, settings and shard assignment,
so a rerun never mixes its shards with another plan's (see `kdscale.cache.sidecar`).

Raw logits are stored; the temperature is chosen at distill time, except for a tail, which is
a mass at one temperature: a cache with a tail serves that temperature only. The manifest
records what the logits were computed from (teacher, tokenizer, data fingerprint, masking
recipe), so that a reader can refuse a cache that does not match, and every shard's name,
rows, examples, size and sha256.

Every file is written under a temporary name in the same directory, fsynced, then renamed over
its final name, so a crash never leaves a half-written file under a final name (see
`kdscale.files`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from kdscale import __version__
from kdscale.cache.sizes import INDEX_DTYPES, narrowest_index_dtype
from kdscale.errors import KdscaleError

CACHE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("dense", "topk")
# manifest dtype name -> (torch dtype, safetensors dtype code)
DTYPES = {
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int8": (torch.int8, "I8"),  # top-k rows only: codes, with a scale and offset per row
}
# The patterns double as a path-traversal guard: a manifest can only name files in its directory.
SHARD_RE = re.compile(r"shard-(\d{5,})\.safetensors")
SIDECAR_RE = re.compile(r"shard-(\d{5,})\.json")
# files.write_bytes_atomic's temporary names: ".<final name>.<random>.tmp"
TMP_RE = re.compile(r"\.(?:shard-\d{5,}\.(?:safetensors|json)|manifest\.json)\.\w+\.tmp")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild it with `kdscale cache`"
OVERWRITE = "use overwrite to replace it, or choose another directory"


class CacheError(KdscaleError):
    """A logit cache is missing, damaged, or cannot be written as asked."""


class CacheMismatchError(CacheError):
    """A logit cache was built for other data, another teacher or another tokenizer."""


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def shard_index(name: str, pattern: re.Pattern = SHARD_RE) -> int | None:
    """The index in a shard (or, with SIDECAR_RE, sidecar) name; None for any other name."""
    m = pattern.fullmatch(name)
    # Only the canonical spelling: "shard-000001" and "shard-00001" must not both be shard 1.
    if m is None or (len(m[1]) > 5 and m[1][0] == "0"):
        return None
    return int(m[1])


# added within format version 1: older manifests lack them
OPTIONAL_FIELDS = {"max_length", "tail_temperature", "audit", "sampling", "index_dtype"}


@dataclasses.dataclass(kw_only=True)
class CacheManifest:
    format_version: int = CACHE_FORMAT_VERSION
    kind: str  # "dense" | "topk"
    num_outputs: int  # classes (dense) or vocabulary size (topk)
    k: int | None  # slots per row for topk; None for dense
    dtype: str  # dtype of logits / values: "float16" | "float32" | "bfloat16" | "int8" (topk)
    num_examples: int
    num_rows: int  # == num_examples, except in a per-position topk cache
    teacher: dict[str, Any]  # e.g. {"name": ..., "weights_sha256": ...}
    tokenizer_sha256: str | None
    data_fingerprint: str
    masking: dict[str, Any] | None  # masked-LM caches: the fixed-mask recipe, e.g. seed
    shards: list[dict[str, Any]]  # {"file", "rows", "examples", "sha256", "bytes"}, by index
    kdscale_version: str = __version__
    # data.max_length of the fingerprint, so that a reader holding the tokenized rows (the
    # Trainer path) can recompute it; absent from caches written before it was recorded.
    max_length: int | None = None
    # topk: the temperature of each row's tail (the teacher's mass off its k slots); None:
    # no tail stored.
    tail_temperature: float | None = None
    # topk: how faithful the k slots are, measured while writing (kdscale.cache.audit)
    audit: dict[str, Any] | None = None
    # topk rows of drawn tokens (cache.kind sampled): {"draws", "temperature", "seed"};
    # None: the rows are the teacher's largest logits (kdscale.cache.sampling)
    sampling: dict[str, Any] | None = None
    # topk: the stored width of the indices, "uint16" | "int32"; None: dense, or a topk cache
    # written before the width was recorded (int32: see `index_dtype_of`)
    index_dtype: str | None = None

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
        missing = [n for n in names if n not in raw and n not in OPTIONAL_FIELDS]
        if missing:
            raise CacheError(f"manifest is missing field(s) {', '.join(map(repr, missing))}")
        # Unknown keys are ignored, so a later v1 writer may add optional fields.
        return cls(**{n: raw[n] for n in names if n in raw})

    @classmethod
    def from_json(cls, text: str) -> CacheManifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CacheError(f"manifest is not valid JSON ({e}); {_REBUILD}") from None
        return cls.from_dict(raw)


def _check(ok: bool, field: str, expected: str, got: Any, where: str = "manifest field") -> None:
    if not ok:
        raise CacheError(f"{where} {field!r}: expected {expected}, got {got!r}")


def is_int(x: Any, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def is_positive(x: Any) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < float("inf")


def check_settings(kind: str, num_outputs: int, k: int | None, dtype: str,
                   where: str = "manifest field", index_dtype: str | None = None) -> None:
    """The settings a shard and a manifest share; shared so both fail with the same words."""
    _check(kind in KINDS, "kind", "'dense' or 'topk'", kind, where)
    _check(is_int(num_outputs, 1), "num_outputs", "an integer >= 1", num_outputs, where)
    if kind == "dense":
        _check(k is None, "k", "null for a dense cache", k, where)
        _check(dtype != "int8", "dtype", "'float16', 'bfloat16' or 'float32' for a dense cache "
               "(int8 codes are for top-k rows)", dtype, where)
        _check(index_dtype is None, "index_dtype", "null for a dense cache", index_dtype, where)
    else:
        _check(is_int(k, 1) and k <= num_outputs, "k",
               f"an integer in [1, num_outputs={num_outputs}] for a topk cache", k, where)
        check_index_dtype(index_dtype, num_outputs, where)
    _check(dtype in DTYPES, "dtype", f"one of {list(DTYPES)}", dtype, where)


def check_index_dtype(index_dtype: str | None, num_outputs: int,
                      where: str = "manifest field") -> None:
    """null (int32, as written before the width was recorded), int32, or uint16 where every
    id and the padding sentinel fit."""
    fits = index_dtype in (None, "int32") or (
        index_dtype == "uint16" and narrowest_index_dtype(num_outputs) == "uint16")
    _check(fits, "index_dtype", f"one of {list(INDEX_DTYPES)} (uint16 only for up to 65535 "
           f"outputs; num_outputs is {num_outputs})", index_dtype, where)


def index_dtype_of(m: CacheManifest) -> str | None:
    """The stored width of a topk cache's indices; None for a dense cache."""
    return None if m.kind == "dense" else m.index_dtype or "int32"


def _validate(m: CacheManifest) -> None:
    _check(m.format_version == CACHE_FORMAT_VERSION, "format_version",
           str(CACHE_FORMAT_VERSION), m.format_version)
    check_settings(m.kind, m.num_outputs, m.k, m.dtype, index_dtype=m.index_dtype)
    _check(isinstance(m.teacher, dict), "teacher", "an object", m.teacher)
    _check(m.tokenizer_sha256 is None or isinstance(m.tokenizer_sha256, str),
           "tokenizer_sha256", "a string or null", m.tokenizer_sha256)
    _check(isinstance(m.data_fingerprint, str), "data_fingerprint", "a string",
           m.data_fingerprint)
    _check(m.masking is None or isinstance(m.masking, dict), "masking", "an object or null",
           m.masking)
    _check(isinstance(m.kdscale_version, str), "kdscale_version", "a string", m.kdscale_version)
    _check(m.max_length is None or is_int(m.max_length, 1), "max_length",
           "an integer >= 1 or null", m.max_length)
    _check(m.tail_temperature is None or (m.kind == "topk" and is_positive(m.tail_temperature)),
           "tail_temperature", "null, or a temperature > 0 for a topk cache",
           m.tail_temperature)
    _check(m.audit is None or isinstance(m.audit, dict), "audit", "an object or null", m.audit)
    _check(m.sampling is None or (m.kind == "topk" and isinstance(m.sampling, dict)
                                  and is_positive(m.sampling.get("temperature"))),
           "sampling", "null, or an object with a temperature > 0 for a topk cache", m.sampling)
    _check(isinstance(m.shards, list), "shards", "a list", m.shards)
    for i, shard in enumerate(m.shards):
        _validate_shard(f"shards[{i}]", i, shard, m.kind)
    for field, key in (("num_rows", "rows"), ("num_examples", "examples")):
        total = sum(s[key] for s in m.shards)
        _check(getattr(m, field) == total, field, f"{total} (the sum of the shards' {key})",
               getattr(m, field))


def _validate_shard(field: str, index: int, shard: Any, kind: str) -> None:
    keys = {"file", "rows", "examples", "sha256", "bytes"}
    _check(isinstance(shard, dict) and keys <= shard.keys(), field,
           f"an object with keys {sorted(keys)}", shard)
    # The list is indexed by shard: entry i names shard i, so no file can be listed twice.
    _check(shard["file"] == shard_file_name(index), f"{field}.file",
           repr(shard_file_name(index)), shard["file"])
    _check(is_int(shard["rows"], 0), f"{field}.rows", "an integer >= 0", shard["rows"])
    _check(is_int(shard["examples"], 0), f"{field}.examples", "an integer >= 0",
           shard["examples"])
    if kind == "dense":
        _check(shard["examples"] == shard["rows"], f"{field}.examples",
               "the shard's rows (one row per example in a dense cache)", shard["examples"])
    _check(is_int(shard["bytes"], 8), f"{field}.bytes", "an integer >= 8", shard["bytes"])
    _check(isinstance(shard["sha256"], str) and _SHA256_RE.fullmatch(shard["sha256"]) is not None,
           f"{field}.sha256", "64 lowercase hex digits", shard["sha256"])


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
        return CacheManifest.from_json(path.read_text(encoding="utf-8"))
    except CacheError as e:
        raise CacheError(f"{path}: {e}") from None
    except (UnicodeDecodeError, OSError) as err:  # random bytes, or unreadable
        raise CacheError(f"{path}: the manifest cannot be read as UTF-8 JSON ({err}); "
                         f"rebuild the cache with `kdscale cache --cache.overwrite true`, or "
                         f"delete {directory}") from None


def shard_metadata(plan_id: str, index: int) -> dict[str, str]:
    # One key: safetensors writes a multi-key metadata map in random order, and the bytes (and
    # sha256) of a shard must not depend on the process that wrote it.
    return {"kdscale_cache": json.dumps(
        {"format_version": CACHE_FORMAT_VERSION, "index": index, "plan_id": plan_id},
        sort_keys=True)}


def read_header(path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """(offset of the data region, parsed header) of a safetensors file.

    A safetensors file is: 8-byte little-endian header length N, N bytes of JSON header
    ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the
    data, with offsets relative to the first byte after the header.
    """
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


def shard_plan_id(path: Path) -> str | None:
    """The plan a shard was written for; None when it has none or cannot be read."""
    try:
        # One handle: another rank may atomically replace the file while this one reads it.
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if n < 1 << 20 else {}
        return json.loads(header["__metadata__"]["kdscale_cache"])["plan_id"]
    except (OSError, KeyError, TypeError, ValueError):
        return None


def few(items: list[Any], limit: int = 5) -> str:
    """'[1, 2]', or '[1, 2, 3, 4, 5, ... (9 in all)]': a message names some, and how many."""
    if len(items) <= limit:
        return str(list(items))
    return f"[{', '.join(map(str, items[:limit]))}, ... ({len(items)} in all)]"

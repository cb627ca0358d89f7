"""Bytes per masked position, modelled and measured, from a cache's own shard files.

A masked-LM cache stores, per position, k slots (a value and an index each), a few fields
of its own (the position, the example id) and, with a tail, one mass; per sentence its id
and its count of positions. The layout (bytes a slot, a row, a tail, an example) is read
from the safetensors headers of a small probe cache, so the k chosen for a byte budget
follow the format kdscale writes today, whatever widths it picks for values and indices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PER_EXAMPLE = ("examples", "counts")  # kdscale.cache.format: one entry per sentence
TAIL = "tail"


def shard_tensors(path: Path) -> dict[str, dict]:
    """name -> {"shape", "bytes"} from a safetensors file's header (8-byte length, JSON)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return {name: {"shape": t["shape"], "bytes": t["data_offsets"][1] - t["data_offsets"][0]}
            for name, t in header.items()}


def measured_layout(cache_dir: Path) -> dict:
    """Bytes a slot, a row's own fields, a tail and an example, as this cache stores them."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    k, totals = manifest["k"], dict.fromkeys(("slot", "row", "tail", "example"), 0)
    for shard in manifest["shards"]:
        for name, tensor in shard_tensors(cache_dir / shard["file"]).items():
            part = part_of(name, tensor["shape"], k)
            totals[part] += tensor["bytes"]
    rows, examples = manifest["num_rows"], manifest["num_examples"]
    return {"slot": totals["slot"] / (rows * k), "row": totals["row"] / rows,
            "tail": totals["tail"] / rows, "example": totals["example"] / examples}


def part_of(name: str, shape: list[int], k: int) -> str:
    """Which part of a position a shard tensor pays for: its k slots, the tail, the sentence,
    or the position's own fields (every other tensor with a row per position)."""
    if name == TAIL:
        return "tail"
    if name in PER_EXAMPLE:
        return "example"
    return "slot" if len(shape) == 2 and shape[1] == k else "row"


def position_bytes(layout: dict, k: int, tail: bool) -> float:
    """A position's own bytes at k slots: what the budget is spent on."""
    return k * layout["slot"] + layout["row"] + (layout["tail"] if tail else 0.0)


def k_for_budget(layout: dict, budget: float, tail: bool) -> int:
    """The most slots whose position bytes fit the budget: any two kinds then differ by less
    than one slot's bytes."""
    k = math.floor((budget - position_bytes(layout, 0, tail)) / layout["slot"])
    if k < 1:
        raise SystemExit(f"bytes_per_position {budget} holds no slot: a position takes "
                         f"{position_bytes(layout, 1, tail):g} bytes with one")
    return k


def measured_bytes(cache_dir: Path) -> dict:
    """The cache's shard files: their bytes on disk, and per masked position."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    on_disk = sum((cache_dir / shard["file"]).stat().st_size for shard in manifest["shards"])
    return {"rows": manifest["num_rows"], "examples": manifest["num_examples"],
            "bytes": on_disk, "bytes_per_position": on_disk / manifest["num_rows"]}

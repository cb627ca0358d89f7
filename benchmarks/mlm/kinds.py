"""The kinds of student the benchmark compares, and the cache each cached kind reads.

bench.yaml's `kinds`: each a layer over the experiment, with `k` saying how many slots its
cache keeps per masked position: `budget` (the most that `bytes_per_position` holds, from
the measured layout), or `vocabulary` (every logit: the dense reference). A kind without `k`
reads no cache (labels alone, alpha 0). Task mlm caches top-k rows only, so the dense
reference is a top-k cache whose k is the whole vocabulary: its softmax is the full
teacher's (float16 logits, as a dense cache stores them), at the price of an index a slot.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.mlm.layout import k_for_budget, measured_bytes, measured_layout, position_bytes
from benchmarks.sst2.evaluation import timed
from benchmarks.sst2.run import kdscale_config
from kdscale.commands.cache import run_cache
from kdscale.config import Config

PROBE_SENTENCES = 16
PROBE_K = 7  # a width no per-position field of the format has: its [rows, 7] tensors are slots


def is_cached(spec: dict) -> bool:
    return "k" in spec


def budget_kinds(kinds: dict) -> list[str]:
    """The cached kinds held to the byte budget: the ones the goals compare."""
    return [name for name, spec in kinds.items() if spec.get("k") == "budget"]


def config_layers(settings: dict, root: Path, name: str, k: int | None) -> list[dict]:
    """The layers over the experiment for kind `name`: KD's loss and its cache, or its own."""
    spec = {key: value for key, value in settings["kinds"][name].items() if key != "k"}
    if k is None:
        return [spec]
    cache = {**spec.get("cache", {}), "dir": str(root / "caches" / name), "k": k}
    return [settings["kd"], spec, {"cache": cache}]


def cache_config(settings: dict, root: Path, name: str, k: int) -> Config:
    return kdscale_config(settings, root, f"cache-{name}", *config_layers(settings, root, name, k))


def probe_config(settings: dict, root: Path) -> Config:
    """A cache of a few sentences with a tail (the one field a tail kind adds): its shards
    give the bytes of a slot, a position's own fields, a tail and a sentence."""
    probe = {"data": {"max_train_examples": PROBE_SENTENCES},
             "cache": {"dir": str(root / "probe"), "kind": "topk", "k": PROBE_K,
                       "tail": True}}
    return kdscale_config(settings, root, "probe", settings["kd"], probe)


def choose_k(settings: dict, layout: dict, vocabulary: int) -> dict[str, int]:
    """Each cached kind's k: every logit, or the most slots the budget holds."""
    chosen = {}
    for name, spec in settings["kinds"].items():
        if spec.get("k") == "vocabulary":
            chosen[name] = vocabulary
        elif spec.get("k") == "budget":
            tail = spec.get("cache", {}).get("tail", False)
            chosen[name] = k_for_budget(layout, settings["bytes_per_position"], tail)
        elif is_cached(spec):
            raise SystemExit(f"bench.yaml kinds.{name}.k: budget or vocabulary, got "
                             f"{spec['k']!r}")
    return chosen


def check_dense_fits(settings: dict, layout: dict, vocabulary: int, rows: int,
                     examples: int) -> None:
    """The dense reference's bytes for these sentences, refused over `dense_max_gib` before
    a byte is written (a cache of the same sentences gave `rows` masked positions)."""
    each = position_bytes(layout, vocabulary, tail=False)
    total = rows * each + examples * layout["example"]
    limit = settings["dense_max_gib"] * 2**30
    if total > limit:
        fit = int(examples * limit / total)
        raise SystemExit(f"the dense reference would take {total / 2**30:.1f} GiB for "
                         f"{examples:,} sentences ({each:,.0f} bytes a masked position), over "
                         f"dense_max_gib {settings['dense_max_gib']}: about {fit:,} sentences "
                         f"fit (--max_train_examples), or raise dense_max_gib")


def cache_record(cache_dir: Path, name: str, spec: dict, layout: dict, k: int) -> dict:
    """What a kind's cache holds: its k, its bytes (modelled and on disk), its audit."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    tail = spec.get("cache", {}).get("tail", False)
    return {"kind": name, "k": k, "stored_as": spec["cache"]["kind"], "tail": tail,
            "dtype": manifest["dtype"], **measured_bytes(cache_dir),
            "position_bytes": position_bytes(layout, k, tail),
            "layout": measured_layout(cache_dir), "audit": manifest.get("audit")}


def build_caches(settings: dict, root: Path, layout: dict, vocabulary: int) -> dict:
    """Each cached kind's cache, built once: the budget kinds first, whose rows tell the
    dense reference's size before it is written."""
    ks = choose_k(settings, layout, vocabulary)
    dense = {name for name in ks if settings["kinds"][name]["k"] == "vocabulary"}
    records = {}
    for name in sorted(ks, key=lambda name: name in dense):  # the dense reference last
        spec = settings["kinds"][name]
        if name in dense and records:
            first = next(iter(records.values()))
            check_dense_fits(settings, layout, vocabulary, first["rows"], first["examples"])
        _, seconds = timed(run_cache, cache_config(settings, root, name, ks[name]))
        records[name] = cache_record(root / "caches" / name, name, spec, layout, ks[name])
        records[name]["seconds"] = round(seconds, 1)
        print(f"cache {name}: k = {ks[name]}, {records[name]['bytes_per_position']:,.1f} bytes "
              f"a masked position ({records[name]['position_bytes']:,.1f} its own), built in "
              f"{seconds:.0f} s", flush=True)
    return {name: records[name] for name in ks}  # bench.yaml's order

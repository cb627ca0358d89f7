"""What a fault may leave and what the rerun must give, compared with an uninterrupted run.

After the fault, before the rerun: every file a rerun would trust (a shard with its sidecar,
a checkpoint with COMPLETE) must hold the uninterrupted run's bytes; anything else may be
debris, but must not be trusted. After the rerun: the cache is the uninterrupted one, byte
for byte, each example once; training resumed from the newest complete checkpoint and ended
with the uninterrupted run's losses and weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from kdscale.cache import read_manifest
from kdscale.cache.format import MANIFEST_NAME
from kdscale.cache.sidecar import finished_shards
from kdscale.files import sha256_file
from kdscale.train.checkpoint import COMPLETE, complete_checkpoints

CHECKPOINT_WEIGHTS = "model.safetensors"  # what Accelerate.save_state writes for the model
_RESUMED = re.compile(r"resuming from \S+ \(step (\d+)\)")
_VOLATILE = {"seconds", "step_ms", "timed_steps"}  # wall-clock figures in a training log


@dataclass
class Reference:
    """The uninterrupted run: shard digests, or checkpoint digests, losses and weights."""
    shards: dict[str, str]  # file -> sha256
    examples: int
    checkpoints: dict[str, str] | None = None  # step directory -> sha256 of its weights
    history: list[dict] | None = None
    student: Path | None = None


def cache_reference(cache: Path) -> Reference:
    manifest = read_manifest(cache)
    return Reference({s["file"]: s["sha256"] for s in manifest.shards}, manifest.num_examples)


def distill_reference(cache: Reference, run: Path) -> Reference:
    root = run / "checkpoints" / "distill"
    digests = {p.name: sha256_file(p / CHECKPOINT_WEIGHTS) for p in complete_checkpoints(root)}
    return Reference(cache.shards, cache.examples, digests, losses(run / "student"),
                     run / "student")


def trusted_shards(cache: Path, reference: Reference) -> tuple[int, list[str]]:
    """(shards a rerun would keep, those of them whose bytes are not the reference's)."""
    if (cache / MANIFEST_NAME).is_file():  # the job finished before the fault landed
        return len(reference.shards), _differing(cache, reference.shards)
    plans = {json.loads(p.read_text()).get("plan_id") for p in cache.glob("shard-*.json")}
    if not plans:
        return 0, []
    # One plan per directory (finished_shards refuses mixed ones, which would be a failure).
    finished = finished_shards(cache, plans.pop())
    bad = [s["file"] for s in finished.values()
           if s["sha256"] != reference.shards.get(s["file"])
           or sha256_file(cache / s["file"]) != s["sha256"]]
    return len(finished), bad


def _differing(cache: Path, digests: dict[str, str]) -> list[str]:
    return [f for f, sha in digests.items()
            if not (cache / f).is_file() or sha256_file(cache / f) != sha]


def finished_cache(cache: Path, reference: Reference) -> dict:
    """Lost and repeated example ids and corrupt shards of a cache the rerun finished, read
    from the shard files themselves (not from the reader, which refuses repeats)."""
    manifest = read_manifest(cache)
    listed = {s["file"]: s["sha256"] for s in manifest.shards}
    corrupt = sorted(set(_differing(cache, reference.shards))
                     | {f for f in listed if listed[f] != reference.shards.get(f)})
    ids: list[int] = []
    for name in listed:
        ids += load_file(cache / name)["example_ids"].tolist()
    distinct = set(ids)
    return {"lost": len(set(range(reference.examples)) - distinct),
            "duplicates": len(ids) - len(distinct), "corrupt": corrupt}


def complete_steps(run: Path, reference: Reference) -> tuple[int, int, list[str]]:
    """(newest complete checkpoint's step or 0, unfinished checkpoint directories, complete
    checkpoints whose weights are not the uninterrupted run's at that step)."""
    root = run / "checkpoints" / "distill"
    complete = complete_checkpoints(root)
    partial = [p for p in root.glob("step-*") if not (p / COMPLETE).exists()] if root.is_dir() \
        else []
    bad = [p.name for p in complete
           if sha256_file(p / CHECKPOINT_WEIGHTS) != reference.checkpoints.get(p.name)]
    newest = int(complete[-1].name.split("-")[1]) if complete else 0
    return newest, len(partial), bad


def resumed_step(output: str) -> int:
    """The step the rerun said it resumed from; 0 when it started afresh."""
    found = _RESUMED.search(output)
    return int(found.group(1)) if found else 0


def losses(student: Path) -> list[dict]:
    log = json.loads((student / "training_log.json").read_text())
    return [{k: v for k, v in record.items() if k not in _VOLATILE} for record in log]


def same_student(student: Path, reference: Reference) -> bool:
    ours, theirs = (load_file(p / "model.safetensors") for p in (student, reference.student))
    same_weights = ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    return same_weights and losses(student) == reference.history

"""One fault against one job, start to verdict: launch, inject, inspect, rerun, compare.

Each fault gets its own output directory; the distill faults all read the reference cache.
The outcome is a flat dict (one row of the harness's table and JSON).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdscale.cache.format import MANIFEST_NAME

from .checks import (
    Reference,
    cache_reference,
    complete_steps,
    distill_reference,
    finished_cache,
    losses,
    resumed_step,
    same_student,
    trusted_shards,
)
from .inject import REPO, Fault, Job, deliver, launch, wait_for_trigger
from .pipeline import CHECKPOINT_EVERY, STEPS, build_pipeline, write_experiment

TIMEOUT_TEXT = "collective operation waited more than"
# What a job is expected to say when a fault hits it (a cache job does not catch SIGTERM:
# it dies, and its rerun keeps every finished shard).
MESSAGES = {"hung_rank": TIMEOUT_TEXT, "sigterm": "stopped on request",
            "disk_full": "could not write|File too large|No space left"}
NOT_CAUGHT = {("cache", "sigterm")}
_SKIPPED = re.compile(r"(\d+) already finished")


@dataclass
class Context:
    job: str  # "cache" or "distill"
    root: Path
    reference: Reference
    timeout_s: float  # KDSCALE_COLLECTIVE_TIMEOUT of the jobs a rank is stopped in
    placement: str = "replicate"  # teacher.placement of the faulted cache jobs

    @property
    def files(self) -> int:
        """Trigger points: shards of the cache, or checkpoints of the distill run."""
        return len(self.reference.shards) if self.job == "cache" else STEPS // CHECKPOINT_EVERY


def prepare(job: str, root: Path, timeout_s: float, placement: str = "replicate") -> Context:
    """The experiment and the uninterrupted runs: the cache by one process with a replicated
    teacher (its bytes depend on neither the world size nor the placement, so a faulted job
    of `placement` must still give them), the student by the same 2-process launch the
    faults hit."""
    config = write_experiment(root, root / "reference", root / "reference" / "cache")
    if not (root / "reference" / "cache" / MANIFEST_NAME).is_file():  # else: built already
        build_pipeline(root)
        result = subprocess.run([sys.executable, "-m", "kdscale", "cache", "--config",
                                 str(config)], cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    reference = cache_reference(root / "reference" / "cache")
    if job == "distill":
        config = write_experiment(root, root / "reference", root / "reference" / "cache",
                                  keep=STEPS)  # every checkpoint kept, to compare with
        run = launch("distill", config)
        assert run.wait(300) == 0, run.output[-3000:]
        reference = distill_reference(reference, root / "reference")
    return Context(job, root, reference, timeout_s, placement)


def draw(ctx: Context, rng, kind: str, early: bool = False) -> Fault:
    if ctx.job == "cache":
        size = min(int(x) for x in _shard_sizes(ctx))
    else:
        size = (ctx.root / "reference" / "student" / "model.safetensors").stat().st_size
    return Fault.draw(rng, kind, ctx.files, size, early)


def _shard_sizes(ctx: Context):
    cache = ctx.root / "reference" / "cache"
    return [(cache / name).stat().st_size for name in ctx.reference.shards]


def run_fault(ctx: Context, fault: Fault, name: str) -> dict:
    run = ctx.root / "faults" / name
    cache = run / "cache" if ctx.job == "cache" else ctx.root / "reference" / "cache"
    config = write_experiment(ctx.root, run, cache, placement=ctx.placement)
    watched, pattern = (cache, "shard-*.json") if ctx.job == "cache" else \
        (run / "checkpoints" / "distill", "step-*")
    job = launch(ctx.job, config, ctx.timeout_s if fault.kind == "hung_rank" else None)
    outcome = {"name": name, **vars(fault), **_inflict(job, fault, _counter(watched, pattern),
                                                        ctx.timeout_s)}
    if (ctx.job, fault.kind) in NOT_CAUGHT:
        outcome["message"] = None
    outcome.update(_cache_verdict(ctx, run, config) if ctx.job == "cache"
                   else _distill_verdict(ctx, run, config))
    if outcome["survived"]:
        shutil.rmtree(run, ignore_errors=True)  # failures stay, to be looked at
    return outcome


def _counter(directory: Path, pattern: str):
    """Files matching `pattern` seen so far (finished shards' sidecars are removed at the
    end, and old checkpoints pruned, so the count keeps every name once seen)."""
    seen: set[str] = set()

    def count() -> int:
        if directory.is_dir():
            seen.update(p.name for p in directory.glob(pattern))
        return len(seen)
    return count


def _inflict(job: Job, fault: Fault, count, timeout_s: float) -> dict:
    landed = wait_for_trigger(job, fault, count) and deliver(job, fault)
    files_at_fault = count()  # 0: the fault landed in start-up, before the first file
    start = time.monotonic()
    if fault.kind == "hung_rank":  # the stopped rank never ends by itself: wait for the error
        while TIMEOUT_TEXT not in job.output and time.monotonic() - start < timeout_s + 120:
            if job.process.poll() is not None:
                break
            time.sleep(0.05)
        status = None
    else:
        status = job.wait(timeout=120)
    error_s = round(time.monotonic() - start, 2)
    job.kill()  # whatever is left: the stopped rank, or a job that hangs (then noted)
    message = re.search(MESSAGES.get(fault.kind, "^$"), job.output) is not None
    return {"injected": landed, "files_at_fault": files_at_fault, "job_status": status,
            "seconds_to_end": error_s,
            "message": message if fault.kind in MESSAGES else None,
            "job_output_tail": None if landed else job.output[-800:]}


def _rerun(ctx: Context, config: Path) -> tuple[int | None, str]:
    job = launch(ctx.job, config)
    status = job.wait(timeout=300)
    if status is None:
        job.kill()
    return status, job.output


def _cache_verdict(ctx: Context, run: Path, config: Path) -> dict:
    kept, bad = trusted_shards(run / "cache", ctx.reference)
    finished = (run / "cache" / MANIFEST_NAME).is_file()
    status, output = _rerun(ctx, config)
    found = finished_cache(run / "cache", ctx.reference) if status == 0 else \
        {"lost": ctx.reference.examples, "duplicates": 0, "corrupt": []}
    skipped = _SKIPPED.search(output)
    skipped = int(skipped.group(1)) if skipped else len(ctx.reference.shards)
    corrupt = sorted(set(bad) | set(found["corrupt"]))
    survived = (status == 0 and not corrupt and skipped == kept
                and found["lost"] == found["duplicates"] == 0)
    return {"kept": kept, "finished_first": finished, "rerun_skipped": skipped,
            "rerun_status": status,
            "lost": found["lost"], "duplicates": found["duplicates"], "corrupt": len(corrupt),
            "corrupt_files": corrupt, "survived": survived,
            "rerun_output_tail": None if survived else output[-3000:]}


def _distill_verdict(ctx: Context, run: Path, config: Path) -> dict:
    newest, partial, bad = complete_steps(run, ctx.reference)
    finished = (run / "student" / "model.safetensors").is_file() and newest == STEPS
    status, output = _rerun(ctx, config)
    resumed = resumed_step(output)
    same = status == 0 and same_student(run / "student", ctx.reference)
    steps = [r["step"] for r in losses(run / "student") if "loss" in r] if status == 0 else []
    wanted = [r["step"] for r in ctx.reference.history if "loss" in r]
    corrupt = len(bad) + (resumed != newest)  # a bad checkpoint kept, or the wrong one read
    survived = status == 0 and same and not corrupt
    return {"kept": newest, "finished_first": finished, "partial_checkpoints": partial,
            "resumed_from": resumed, "rerun_status": status, "same_student": same,
            "lost": len(set(wanted) - set(steps)), "duplicates": len(steps) - len(set(steps)),
            "corrupt": corrupt, "corrupt_files": bad, "survived": survived,
            "rerun_output_tail": None if survived else output[-3000:]}

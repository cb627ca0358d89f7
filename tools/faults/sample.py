"""The faults CI runs: one of each kind, drawn from a seed that changes every day.

A full harness run (25 faults a job) takes half an hour; CI has minutes. So each CI run
takes one fault of each kind, and the seed decides the rest: which three kinds hit the cache
job (its teacher under ZeRO-3) and which two the distill job, which kill lands in start-up
before the job's first file, and each fault's victim rank, trigger and file size limit.
Over days the sample covers what one run cannot. The seed is today's date (UTC, as
YYYYMMDD) unless KDSCALE_FAULT_SEED is set; each fault draws from its own generator
(seed and kind), so one can be replayed alone:

    python -m tools.faults.harness --sample --seed 20250101 --only kill_rank --timeout 5
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

from .inject import KINDS

SEED_VARIABLE = "KDSCALE_FAULT_SEED"
JOBS = ("cache", "cache", "cache", "distill", "distill")  # one a kind, after a shuffle
KILLS = ("kill_rank", "kill_job")
CACHE_PLACEMENT = "zero3"  # the harness's own runs use a replicated teacher


@dataclass(frozen=True)
class Pick:
    kind: str
    job: str  # "cache" or "distill"
    early: bool  # lands in start-up, before the job writes its first file


def fault_seed() -> int:
    """KDSCALE_FAULT_SEED, else today's date (UTC) as YYYYMMDD."""
    text = os.environ.get(SEED_VARIABLE)
    if text:
        return int(text)
    return int(datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"))


def sample(seed: int) -> list[Pick]:
    """One fault of each kind, in the order of KINDS: its job, and whether it is early."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    early = rng.choice(KILLS)
    jobs = dict(zip(kinds, JOBS, strict=True))
    return [Pick(kind, jobs[kind], kind == early) for kind in KINDS]


def fault_rng(seed: int, kind: str) -> random.Random:
    """The generator one sampled fault is drawn from: replaying it needs no other draw."""
    return random.Random(f"{seed}:{kind}")


def replay_command(seed: int, kind: str, timeout_s: float) -> str:
    return (f"python -m tools.faults.harness --sample --seed {seed} --only {kind} "
            f"--timeout {timeout_s:g}")

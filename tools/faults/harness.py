"""The fault-injection harness: N seeded faults against a real 2-process job, a table of
what survived, and the figures as JSON.

    python -m tools.faults.harness --kind cache --faults 20 --seed 0 --out cache.json
    python -m tools.faults.harness --kind distill --faults 20 --seed 0 --out distill.json
    python -m tools.faults.harness --sample --seed 20250101   # what CI ran that day

Faults cycle through the kinds (kill_rank, kill_job, sigterm, disk_full, hung_rank); the seed
draws each one's victim rank, trigger point and file size limit. `--sample` runs CI's one
fault of each kind (tools/faults/sample.py), `--only KIND` one of them. Exit status 1 when
any fault was not survived.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from .inject import KINDS
from .sample import CACHE_PLACEMENT, Pick, fault_rng, sample
from .scenarios import Context, draw, prepare, run_fault

COLUMNS = ("injected", "survived", "lost", "duplicates", "corrupt", "message")


def run_harness(job: str, faults: int, seed: int, root: Path, timeout_s: float,
                kinds: tuple[str, ...] = KINDS, echo=print, placement: str = "replicate") -> dict:
    start = time.monotonic()
    ctx = prepare(job, root, timeout_s, placement)
    rng = random.Random(seed)
    outcomes = []
    for index in range(faults):
        fault = draw(ctx, rng, kinds[index % len(kinds)])
        outcomes.append(run_fault(ctx, fault, f"{index:03d}-{fault.kind}"))
        echo(_line(outcomes[-1]))
    return _results(job, seed, timeout_s, start, outcomes)


def run_sample(seed: int, root: Path, timeout_s: float, only: str | None = None,
               echo=print) -> dict:
    """CI's sample of `seed` (or its fault of kind `only`), each fault against its job."""
    start = time.monotonic()
    picks = [p for p in sample(seed) if only in (None, p.kind)]
    contexts = prepare_sample(root, timeout_s, {p.job for p in picks})
    outcomes = []
    for pick in picks:
        outcomes.append(run_pick(contexts[pick.job], pick, seed))
        echo(_line(outcomes[-1]))
    return _results("sample", seed, timeout_s, start, outcomes)


def prepare_sample(root: Path, timeout_s: float, jobs: set[str]) -> dict[str, Context]:
    """The sample's jobs over one experiment: the cache job's teacher under ZeRO-3."""
    contexts = {"cache": prepare("cache", root, timeout_s, CACHE_PLACEMENT)}
    if "distill" in jobs:
        contexts["distill"] = prepare("distill", root, timeout_s)
    return contexts


def run_pick(ctx: Context, pick: Pick, seed: int) -> dict:
    fault = draw(ctx, fault_rng(seed, pick.kind), pick.kind, pick.early)
    return {"job": pick.job, **run_fault(ctx, fault, f"{seed}-{pick.job}-{pick.kind}")}


def _results(job: str, seed: int, timeout_s: float, start: float, outcomes: list[dict]) -> dict:
    return {"job": job, "faults": len(outcomes), "seed": seed, "collective_timeout_s": timeout_s,
            "seconds": round(time.monotonic() - start, 1), "machine": _machine(),
            "summary": summarize(outcomes), "hung_rank_error_s": _error_seconds(outcomes),
            "outcomes": outcomes}


def _error_seconds(outcomes: list[dict]) -> list[float]:
    """From SIGSTOP to the other rank's timeout error, for each hung rank that gave one."""
    return [o["seconds_to_end"] for o in outcomes if o["kind"] == "hung_rank" and o["message"]]


def summarize(outcomes: list[dict]) -> dict:
    """Per fault kind and in total: how many landed, survived, and what was lost."""
    rows: dict[str, dict] = {}
    for o in outcomes:
        for key in (o["kind"], "total"):
            row = rows.setdefault(key, {"faults": 0, **{c: 0 for c in COLUMNS}})
            row["faults"] += 1
            row["injected"] += bool(o["injected"])
            row["survived"] += bool(o["survived"])
            row["message"] += bool(o["message"])
            for column in ("lost", "duplicates", "corrupt"):
                row[column] += o[column]
    rows["total"] = rows.pop("total")  # the last line of the table
    return rows


def table(summary: dict) -> str:
    head = ["fault", "faults", *COLUMNS]
    lines = [f"{head[0]:<10}" + "".join(f"{h:>11}" for h in head[1:])]
    for kind, row in summary.items():
        lines.append(f"{kind:<10}" + "".join(f"{row[h]:>11}" for h in head[1:]))
    return "\n".join(lines)


def _line(o: dict) -> str:
    verdict = "survived" if o["survived"] else "FAILED"
    trigger = "in start-up" if o.get("early") else f"after {o['after_files']:>2} files"
    return (f"{o['name']:<16} rank {o['rank']} {trigger} "
            f"+{o['delay_s']:.3f} s: injected={o['injected']} job={o['job_status']} "
            f"kept={o['kept']} lost={o['lost']} dup={o['duplicates']} "
            f"corrupt={o['corrupt']} message={o['message']} -> {verdict}")


def _machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processes_per_job": 2, "backend": "gloo"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.kind is None) != args.sample or (args.only and not args.sample):
        parser.error("give --kind (a harness run) or --sample (CI's faults, --only one kind)")
    with tempfile.TemporaryDirectory(prefix="kdscale-faults-") as tmp:
        root = args.workdir or Path(tmp)
        if args.sample:
            results = run_sample(args.seed, root, args.timeout, args.only)
        else:
            results = run_harness(args.kind, args.faults, args.seed, root, args.timeout,
                                  placement=args.placement)
    print(table(results["summary"]))
    print(f"{results['faults']} faults in {results['seconds']:.0f} s; a hung rank's peer "
          f"failed {results['hung_rank_error_s']} s after the SIGSTOP (timeout "
          f"{args.timeout:g} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results["summary"]["total"]["survived"] == results["faults"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("cache", "distill"), help="the job to fault")
    parser.add_argument("--faults", type=int, default=10, help="faults to inject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placement", choices=("replicate", "zero3"), default="replicate",
                        help="teacher.placement of a faulted cache job")
    parser.add_argument("--sample", action="store_true",
                        help="CI's sample of --seed: one fault of each kind, either job")
    parser.add_argument("--only", choices=KINDS, help="with --sample: that kind's fault alone")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="KDSCALE_COLLECTIVE_TIMEOUT of the jobs, seconds")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())

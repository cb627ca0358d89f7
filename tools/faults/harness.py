"""The fault-injection harness: N seeded faults against a real 2-process job, a table of
what survived, and the figures as JSON.

    python -m tools.faults.harness --kind cache --faults 20 --seed 0 --out cache.json
    python -m tools.faults.harness --kind distill --faults 20 --seed 0 --out distill.json

Faults cycle through the kinds (kill_rank, kill_job, sigterm, disk_full, hung_rank); the seed
draws each one's victim rank, trigger point and file size limit. Exit status 1 when any
fault was not survived.
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
from .scenarios import draw, prepare, run_fault

COLUMNS = ("injected", "survived", "lost", "duplicates", "corrupt", "message")


def run_harness(job: str, faults: int, seed: int, root: Path, timeout_s: float,
                kinds: tuple[str, ...] = KINDS, echo=print) -> dict:
    start = time.monotonic()
    ctx = prepare(job, root, timeout_s)
    rng = random.Random(seed)
    outcomes = []
    for index in range(faults):
        fault = draw(ctx, rng, kinds[index % len(kinds)])
        outcomes.append(run_fault(ctx, fault, f"{index:03d}-{fault.kind}"))
        echo(_line(outcomes[-1]))
    return {"job": job, "faults": faults, "seed": seed, "collective_timeout_s": timeout_s,
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
    return (f"{o['name']:<16} rank {o['rank']} after {o['after_files']:>2} files "
            f"+{o['delay_s']:.3f} s: injected={o['injected']} job={o['job_status']} "
            f"kept={o['kept']} lost={o['lost']} dup={o['duplicates']} "
            f"corrupt={o['corrupt']} message={o['message']} -> {verdict}")


def _machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processes_per_job": 2, "backend": "gloo"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("cache", "distill"), required=True)
    parser.add_argument("--faults", type=int, default=10, help="faults to inject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="KDSCALE_COLLECTIVE_TIMEOUT of the jobs, seconds")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdscale-faults-") as tmp:
        root = args.workdir or Path(tmp)
        results = run_harness(args.kind, args.faults, args.seed, root, args.timeout)
    print(table(results["summary"]))
    print(f"{args.faults} faults in {results['seconds']:.0f} s; a hung rank's peer failed "
          f"{results['hung_rank_error_s']} s after the SIGSTOP (timeout {args.timeout:g} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results["summary"]["total"]["survived"] == args.faults else 1


if __name__ == "__main__":
    raise SystemExit(main())

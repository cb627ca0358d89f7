"""A committed results folder's report again, without rerunning a job:
`python -m benchmarks.scale.regenerate benchmarks/scale/results/probe`.

The measured figures (peak memory, times, hashes) and the commit that measured them stay
as they are; the predictions are re-derived with the planner of this checkout, and the
results name the commit that re-derived them. A record whose plans measured no runtime (the
first probe's) takes this machine's, measured now: run it on the machine kind that measured
the jobs (results.json's "device")."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.provenance import provenance
from benchmarks.scale import report
from kdscale.commands.env import measured_runtime_bytes
from kdscale.commands.report import device_name
from kdscale.plan.runtime import runtime_term


def regenerate(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    runtime = runtime_term("cpu", measured_bytes=measured_runtime_bytes())
    measured = [{k: v for k, v in job.items() if not k.startswith("predicted")}
                for job in results["jobs"]]
    jobs = [report.with_verdict(job, results["settings"], runtime) for job in measured]
    note = (f"runtime {runtime.bytes / report.GiB:.2f} GiB measured on {device_name()} at "
            f"regeneration, where a job's plan recorded none")
    results = {**results, "jobs": jobs, "checks": report.checks(jobs),
               "predictions": {**provenance(), "runtime_bytes": runtime.bytes, "note": note}}
    report.write(results, folder)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a results folder holding results.json")
    regenerate(p.parse_args(argv).folder)


if __name__ == "__main__":
    main()

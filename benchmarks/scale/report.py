"""The scale benchmark's results: JSON, report.md and a plot of measured against predicted
memory per process. A prediction is the planner's (`kdscale env`'s) peak bytes per process
for that job's stage and launch, term by term, re-derived here from the numbers the job's
plan recorded (benchmarks/scale/replan.py), so a report always shows the planner's current
model; a measurement is the largest peak RSS over the job's ranks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.provenance import provenance
from benchmarks.scale.extrapolate import extrapolate
from benchmarks.scale.replan import replanned
from kdscale.commands.report import device_name
from kdscale.plan.memory import Term

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
GOAL = 0.25  # |measured / predicted - 1| for every job


def recorded_runtime(job: dict) -> Term | None:
    """The runtime `kdscale env` measured before the job, where its plan recorded one."""
    runtime = job["plan"].get("memory", {}).get("runtime")
    return Term(**runtime) if runtime else None


def peaks(job: dict) -> list[int]:
    """Peak memory per rank of the job's device: GPU memory where measured, else RSS (on a
    CPU the device is the host's memory)."""
    return job.get("peak_device") or job["peak_rss"]


def with_verdict(job: dict, settings: dict, runtime: Term | None = None) -> dict:
    """The job with the planner's prediction and its error. `runtime`: for a record whose
    plan measured none (the first probe's), one measured since on the same kind of machine."""
    stage = replanned(job, settings, recorded_runtime(job) or runtime)
    predicted, peak = stage["total"], max(peaks(job))
    error = peak / predicted - 1
    return {**job, "predicted_bytes": predicted, "predicted_terms": stage["terms"],
            "predicted_load_terms": stage["load_terms"],
            "predicted_save_terms": stage["save_terms"], "measured_bytes": peak,
            "error": error, "within_goal": abs(error) <= GOAL}


def checks(jobs: list[dict]) -> dict:
    caches = [j for j in jobs if j["job"].startswith("cache")]
    out = {}
    if caches:  # against the first, the reference (one process, a replica)
        out["caches_differing"] = [j["job"] for j in caches
                                   if j["shard_sha256"] != caches[0]["shard_sha256"]]
        out["caches_identical"] = not out["caches_differing"]
    replicated = next((j for j in caches if j["job"].startswith("cache-replicate")), None)
    sharded = next((j for j in caches if j["job"] == "cache-zero3-x2"), None)
    if replicated and sharded:
        held = max(rank["params_held"] for rank in sharded["ranks"])
        out["zero3_params_share"] = held / replicated["num_params"]
    out["all_within_goal"] = all(j["within_goal"] for j in jobs)
    return out


def portable(value, work: Path):
    """`value` with the work folder written as <work> and repository files by their relative
    path: results name no machine's paths."""
    if isinstance(value, dict):
        return {key: portable(item, work) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, work) for item in value]
    if isinstance(value, str):
        value = value.replace(str(work.resolve()), "<work>").replace(str(work), "<work>")
        return value.replace(f"{REPO}/", "")  # repository files by their relative path
    return value


def build(settings: dict, setup: dict, jobs: list[dict], kdscale_src, total_s: float,
          work: Path) -> dict:
    jobs = [with_verdict(portable(job, work), settings) for job in jobs]
    return {"device": device_name(), **provenance(), "torch": torch.__version__,
            "kdscale_src": "another checkout" if kdscale_src else None, "settings": settings,
            "setup": setup, "total_s": round(total_s, 1), "jobs": jobs, "checks": checks(jobs),
            "extrapolation": extrapolate(jobs)}


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def job_line(job: dict) -> str:
    per_rank = ", ".join(gib(p) for p in peaks(job))
    extra = ""
    if "ranks" in job:
        rate = sum(r["examples"] for r in job["ranks"]) / max(r["seconds"] for r in job["ranks"])
        extra = f", {rate:.1f} examples/s"
    if job.get("step_ms"):
        extra = f", {job['step_ms']['step']:.0f} ms/step"
    return f"{job['job']}: {job['wall_s']:.0f} s, peak GiB per rank [{per_rank}]{extra}"


def table(jobs: list[dict]) -> list[str]:
    lines = ["| job | processes | wall s | peak GiB per rank | predicted GiB | error | "
             "within 25% | throughput |", "|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        error = f"{j['error']:+.0%}"
        throughput = job_line(j).rsplit(", ", 1)[-1] if ("ranks" in j or j.get("step_ms")) \
            else "-"
        lines.append(f"| {j['job']} | {j['processes']} | {j['wall_s']:.0f} | "
                     f"{', '.join(gib(p) for p in peaks(j))} | {gib(j['predicted_bytes'])}"
                     f" | {error} | {'yes' if j['within_goal'] else 'no'} | {throughput} |")
    return lines


def cache_rows(jobs: list[dict]) -> list[str]:
    lines = ["| placement | processes | parameters held per rank | share |", "|---|---|---|---|"]
    for j in jobs:
        if "ranks" in j:
            held = [r["params_held"] for r in j["ranks"]]
            lines.append(f"| {j['placement']} | {j['processes']} | "
                         f"{', '.join(f'{h:,}' for h in held)} | "
                         f"{max(held) / j['num_params']:.0%} |")
    return lines


def step_rows(jobs: list[dict]) -> list[str]:
    trained = [j for j in jobs if j.get("step_ms")]
    if not trained:
        return []
    phases = list(trained[0]["step_ms"])
    lines = [f"| job | {' | '.join(phases)} |", "|---" * (len(phases) + 1) + "|"]
    lines += [f"| {j['job']} | " + " | ".join(f"{j['step_ms'][p]:.0f}" for p in phases) + " |"
              for j in trained]
    return lines


def term_rows(jobs: list[dict]) -> list[str]:
    """Each prediction as the sum of its named terms (kdscale env prints how each is
    counted); a stage whose load outweighs its run says so."""
    lines = []
    for j in jobs:
        run = " + ".join(f"{t['name']} {gib(t['bytes'])}" for t in j["predicted_terms"]
                         if t["where"] == "device")
        lines.append(f"- {j['job']}: {run}")
        run_total = sum(t["bytes"] for t in j["predicted_terms"])
        for phase in ("load", "save"):
            terms = j.get(f"predicted_{phase}_terms") or []
            if sum(t["bytes"] for t in terms) > run_total:
                lines.append(f"  (the peak is its {phase}: " + " + ".join(
                    f"{t['name']} {gib(t['bytes'])}" for t in terms) + ")")
    return lines


def sources(results: dict) -> str:
    measured = (f"measured at commit {results['commit'][:10]}" if results.get("commit")
                else "measured at no commit") + \
        ("" if results.get("clean_tree") else " (uncommitted changes)")
    again = results.get("predictions")
    if again:
        measured += (f"; predictions re-derived at commit {again['commit'][:10]} "
                     f"({again['note']})")
    return measured


def markdown(results: dict) -> str:
    lines = [f"# BERT-large at its true size: {results['device']}", "",
             f"{results['setup']['rows']} SST-2 rows; vocabulary {results['setup']['vocabulary']}"
             f"; {sources(results)}; whole benchmark {results['total_s'] / 60:.1f} min.", "",
             *table(results["jobs"]), "", "Predicted GiB per process, term by term:", "",
             *term_rows(results["jobs"]), "", *cache_rows(results["jobs"]), "",
             "Step time per phase, ms (mean after the first log window):", "",
             *step_rows(results["jobs"]), "", "Checks: " + json.dumps(results["checks"]), "",
             "## Beyond one machine, on paper", "", *results["extrapolation"]["lines"], "",
             "![measured against predicted memory](scale_bench.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = results["jobs"]
    fig, ax = plt.subplots(figsize=(max(6, len(jobs)), 4))
    xs = range(len(jobs))
    ax.bar([x - 0.2 for x in xs], [j["measured_bytes"] / GiB for j in jobs], 0.4,
           label="measured peak RSS (largest rank)")
    ax.bar([x + 0.2 for x in xs], [j["predicted_bytes"] / GiB for j in jobs], 0.4,
           label="kdscale env's prediction")
    ax.set_xticks(list(xs), [j["job"] for j in jobs], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="GiB per process", title=f"BERT-large on {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "scale_bench.png")
    print(markdown(results))

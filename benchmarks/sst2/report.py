"""The SST-2 benchmark's results: the JSON, report.md (tables.py) and a plot (plot.py).

Spread over seeds is the sample standard deviation and the min-max range; with one seed there
is none, and the report says so. One dev row is 1/872 = 0.11 points. Pipeline wall time =
teacher fine-tune (+ cache, kdscale) + one run of each KD student (the mean over seeds): what
it takes to produce the models once. The ablation's pipelines are one seed's.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks.provenance import provenance
from benchmarks.sst2.goals import goals
from benchmarks.sst2.plot import plot
from benchmarks.sst2.tables import markdown
from kdscale.commands.report import device_name


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else None, "min": min(values), "max": max(values), "n": len(values)}


def summarize_runs(runs: list[dict], teacher: dict) -> dict:
    dev = [r["accuracy"] for r in runs]
    test = [r["test"]["accuracy"] for r in runs]
    latency = statistics.fmean(r["latency_ms"] for r in runs)
    return {"accuracy": spread(dev), "test_accuracy": spread(test),
            "retention": spread([a / teacher["accuracy"] for a in dev]),
            "test_retention": spread([a / teacher["test"]["accuracy"] for a in test]),
            "params": runs[0]["params"], "layers": runs[0]["layers"],
            "teacher_layers": runs[0]["teacher_layers"], "steps": runs[0].get("steps"),
            "latency_ms": latency, "speedup": teacher["latency_ms"] / latency,
            "train_s": statistics.fmean(r["train_s"] for r in runs)}


def summarize_side(side: dict) -> dict:
    students = {name: {kind: summarize_runs(runs, side["teacher"]) for kind, runs in kinds.items()}
                for name, kinds in side["students"].items()}
    pipeline = side["teacher"]["train_s"] + side.get("cache_s", 0.0)
    pipeline += sum(kinds["kd"]["train_s"] for kinds in students.values())
    return {"students": students, "pipeline_s": pipeline}


def step_pipeline_s(step: dict) -> float:
    """A step's whole pipeline: its teacher (shared or not), its cache, its students."""
    return (step["teacher"]["train_s"] + step["cache_s"]
            + sum(run["train_s"] for run in step["students"].values()))


def summarize_ablation(ablation: dict, kdscale_pipeline_s: float) -> dict:
    """Each step's pipeline, its saving on the step before and its share of the whole saving
    (step 0 to the last step: the shares add up to 100%); kdscale's pipeline against step 0,
    the last step and the step before it (the engineering without the cache)."""
    pipelines = [step_pipeline_s(step) for step in ablation["steps"]]
    total = pipelines[0] - pipelines[-1]
    steps = []
    for i, step in enumerate(ablation["steps"]):
        saving = pipelines[i - 1] - pipelines[i] if i else None
        steps.append({"step": step["step"], "pipeline_s": pipelines[i], "saving_s": saving,
                      "share": saving / total if saving is not None and total else None,
                      "of_today": pipelines[i] / pipelines[0]})
    before_cache = pipelines[-2] if len(pipelines) > 1 else pipelines[0]
    return {"seed": ablation["seed"], "steps": steps, "total_saving_s": total,
            "kdscale": {"pipeline_s": kdscale_pipeline_s,
                        "of_today": kdscale_pipeline_s / pipelines[0],
                        "of_last_step": kdscale_pipeline_s / pipelines[-1],
                        "of_step_before_last": kdscale_pipeline_s / before_cache}}


def summarize_levers(kd_side: dict, kd: dict) -> dict | None:
    """Each lever's students against kdscale's recipe (the main comparison's KD students,
    the same seeds): their spread, retention of the teacher they learned from, and the
    difference of the means."""
    if not kd_side.get("levers"):
        return None
    out = {}
    for name, lever in kd_side["levers"].items():
        teacher = lever["teacher"] or kd_side["teacher"]
        students = {size: summarize_runs(runs, teacher)
                    for size, runs in lever["students"].items()}
        recipe = {size: kd["students"][size]["kd"] for size in students}
        out[name] = {"teacher": {"accuracy": teacher["accuracy"],
                                 "test_accuracy": teacher["test"]["accuracy"],
                                 "own": lever["teacher"] is not None},
                     "students": students,
                     "gain": {size: {split: s[key]["mean"] - recipe[size][key]["mean"]
                                     for split, key in (("dev", "accuracy"),
                                                        ("test", "test_accuracy"))}
                              for size, s in students.items()}}
    return out


def part_times(total_s: float, kd_side: dict, base_side: dict | None,
               ablation: dict | None) -> dict:
    """The whole run in parts: the controls', the levers' and the ablation's seconds, and the
    rest (the main comparison), so that a time goal set before them keeps its meaning."""
    controls = kd_side.get("controls_s", 0.0) + (base_side or {}).get("controls_s", 0.0)
    ablation_s = ablation["seconds"] if ablation else 0.0
    levers_s = kd_side.get("levers_s", 0.0)
    return {"total_s": round(total_s, 1), "controls_s": round(controls, 1),
            "ablation_s": round(ablation_s, 1), "levers_s": round(levers_s, 1),
            "main_s": round(total_s - controls - ablation_s - levers_s, 1)}


def build(settings: dict, rows: dict, kd_side: dict, base_side: dict | None,
          ablation: dict | None, total_s: float) -> dict:
    kd = summarize_side(kd_side)
    base = summarize_side(base_side) if base_side else None
    times = part_times(total_s, kd_side, base_side, ablation)
    summary = {"kdscale": kd, "baseline": base,
               "ablation": summarize_ablation(ablation, kd["pipeline_s"]) if ablation else None,
               "levers": summarize_levers(kd_side, kd),
               "goals": goals(settings, kd, base, times)}
    return {"device": device_name(), **provenance(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "eval_device": "cpu",
            "cuda": torch.cuda.is_available(), "total_s": times["total_s"], "times": times,
            "dev": rows["dev"], "test": rows["test"], "train_rows": kd_side["train_rows"],
            "transfer_rows": kd_side["transfer_rows"], "settings": settings,
            "summary": summary, "kdscale": kd_side, "baseline": base_side, "ablation": ablation}


def archive_previous(out: Path) -> Path | None:
    """An earlier run's results.json and report.md in `out` move to history/<its commit>/
    rather than being overwritten: a run that missed its goals stays in the record beside
    the one that met them."""
    if not (out / "results.json").is_file():
        return None
    earlier = json.loads((out / "results.json").read_text())
    label = (earlier.get("commit") or (earlier.get("provenance") or {}).get("committed_in")
             or "uncommitted")[:7]
    target, n = out / "history" / label, 2
    while target.exists():
        target, n = out / "history" / f"{label}-{n}", n + 1
    target.mkdir(parents=True)
    for name in ("results.json", "report.md"):
        if (out / name).is_file():
            (out / name).rename(target / name)
    print(f"the earlier results in {out} moved to {target}: give it a row in "
          f"{out / 'history' / 'README.md'}")
    return target


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    archive_previous(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "sst2_bench.png")
    print(markdown(results))
    print(f"results written to {out}/results.json, report.md, sst2_bench.png")

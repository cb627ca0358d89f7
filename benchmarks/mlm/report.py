"""The MLM benchmark's results: the JSON and report.md (tables.py).

Spread over seeds is the sample standard deviation and the min-max range, with n the number
of seeds; with one seed there is none, and the report says n = 1 and shows no spread.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch

from benchmarks.mlm.goals import goals
from benchmarks.mlm.kinds import budget_kinds
from benchmarks.mlm.tables import markdown
from benchmarks.sst2.report import archive_previous, spread
from kdscale.commands.report import device_name


def summarize(runs: list[dict]) -> dict:
    """One kind's seeds: accuracy and perplexity spread, steps and mean training seconds."""
    return {"accuracy": spread([r["accuracy"] for r in runs]),
            "perplexity": spread([r["perplexity"] for r in runs]),
            "seeds": [r["seed"] for r in runs], "steps": sorted({r["steps"] for r in runs}),
            "train_s": statistics.fmean(r["train_s"] for r in runs)}


def part_times(seconds: dict, caches: dict, students: dict, total_s: float) -> dict:
    """The whole run in parts: teacher, probe, each cache, each kind's students' training
    (all seeds), scoring (the teacher's and every student's) and truncation."""
    scoring = seconds["scoring"] + sum(r["score_s"] for runs in students.values() for r in runs)
    return {**seconds, "scoring": round(scoring, 1),
            "caches": {name: c["seconds"] for name, c in caches.items()},
            "students": {name: round(sum(r["train_s"] for r in runs), 1)
                         for name, runs in students.items()},
            "total_s": round(total_s, 1)}


def build(settings: dict, parts: dict, total_s: float, source: dict) -> dict:
    """parts: seconds, layout, caches, teacher, students (kind -> runs), truncation; source:
    the provenance of the code, taken as the run started."""
    summary = {name: summarize(runs) for name, runs in parts["students"].items()}
    cached = budget_kinds(settings["kinds"])
    return {"device": device_name(), **source, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "settings": settings, "budget_kinds": cached,
            "times": part_times(parts["seconds"], parts["caches"], parts["students"], total_s),
            "layout": parts["layout"], "caches": parts["caches"], "teacher": parts["teacher"],
            "students": parts["students"], "summary": summary,
            "goals": goals(settings, summary, parts["caches"], cached),
            "truncation": parts["truncation"]}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    archive_previous(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    print(markdown(results))
    print(f"results written to {out}/results.json, report.md")

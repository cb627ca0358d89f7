"""Benchmark of the distillation step, cached teacher vs online teacher:
`python -m benchmarks.distill [--out FILE]`.

A teacher 4x the student's depth (8 layers; the student keeps 2 of them) and the same
data, batches and steps. The cached run reads the teacher's logits from the cache written
once by `kdscale cache`; the online run runs the teacher's forward beside the student at
every step. Each is a real `kdscale distill` process, alternated and repeated; the step
time per phase comes from the runs' own breakdown (`step_ms` in training_log.json), its
first log window (warm-up) left out.

The cache pays off when it saves (nearly) all of the teacher's share of the online step:
    saved = online step - cached step,   goal: saved >= 90% of the online teacher phase.
Prints a table and writes JSON with the device name. Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cache.run import build_teacher
from benchmarks.provenance import provenance
from kdscale.commands.demo import write_demo_task
from kdscale.commands.report import device_name
from kdscale.train.timing import PHASES, overall_breakdown

GOAL = 0.9  # the share of the teacher's time the cache must save


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--teacher_layers", type=int, default=8)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="runs of each, alternated")
    return p.parse_args(argv)


def experiment(args: argparse.Namespace, root: Path) -> dict:
    files = write_demo_task(root / "data", n_train=args.examples, n_eval=10)
    teacher = build_teacher(root, args.hidden, args.teacher_layers)
    return {
        "output_dir": str(root / "run"),
        "teacher": {"checkpoint": str(teacher), "placement": "replicate"},
        "student": {"layers": f"uniform:{args.student_layers}", "dropout": 0.0},
        "data": {"train_file": str(files["train"]), "eval_file": str(files["dev"]),
                 "max_length": 64},
        "cache": {"batch_size": 128, "overwrite": True},
        "distill": {"max_steps": args.steps, "batch_size": args.batch_size,
                    "log_every": args.log_every, "report_to": "none"},
    }


def kdscale(command: str, config: Path, *overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kdscale", command, "--config", str(config),
                             *overrides], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kdscale {command} failed:\n{result.stderr[-3000:]}")


def distill_breakdown(config: Path, source: str) -> dict[str, float]:
    """One `kdscale distill` run; its mean ms per phase after the warm-up window."""
    kdscale("distill", config, "--teacher.source", source)
    run = json.loads(config.read_text())["output_dir"]
    history = json.loads((Path(run) / "student" / "training_log.json").read_text())
    return overall_breakdown([r for r in history if "loss" in r][1:])


def median_breakdown(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(statistics.median(r[name] for r in runs), 3) for name in runs[0]}


def summarize(cached: dict, online: dict) -> dict:
    saved = online["step"] - cached["step"]
    teacher = online["teacher"]
    return {"cached_steps_per_s": 1000 / cached["step"],
            "online_steps_per_s": 1000 / online["step"],
            "speedup": online["step"] / cached["step"], "saved_ms": saved, "teacher_ms": teacher,
            "teacher_share_of_online": teacher / online["step"],
            "saved_fraction_of_teacher": saved / teacher if teacher else float("nan"),
            "goal_met": bool(teacher and saved >= GOAL * teacher)}


def print_table(cached: dict, online: dict, summary: dict) -> None:
    print(f"{'ms/step':>8} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>9}")
    for name, times in (("cached", cached), ("online", online)):
        print(f"{name:>8} " + " ".join(f"{times[p]:9.1f}" for p in PHASES)
              + f" {times['step']:9.1f}")
    print(f"cached {summary['cached_steps_per_s']:.1f} steps/s, online "
          f"{summary['online_steps_per_s']:.1f} steps/s: {summary['speedup']:.2f}x; the cache "
          f"saves {summary['saved_ms']:.1f} ms of the teacher's {summary['teacher_ms']:.1f} ms "
          f"({summary['saved_fraction_of_teacher']:.0%}; goal >= {GOAL:.0%}: "
          f"{'met' if summary['goal_met'] else 'NOT met'})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdscale-distill-bench-") as tmp:
        root = Path(tmp)
        config = root / "experiment.yaml"
        config.write_text(json.dumps(experiment(args, root)))  # JSON is YAML
        kdscale("cache", config)
        runs = {"cached": [], "online": []}
        for _ in range(args.repeats):  # alternated: both see the same machine state
            runs["cached"].append(distill_breakdown(config, "cache"))
            runs["online"].append(distill_breakdown(config, "online"))
    cached, online = median_breakdown(runs["cached"]), median_breakdown(runs["online"])
    summary = summarize(cached, online)
    print_table(cached, online, summary)
    result = {"device": device_name(), **provenance(),
              "settings": vars(args) | {"out": str(args.out)},
              "step_ms": {"cached": cached, "online": online}, "runs": runs, **summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"results written to {args.out}")
    return result



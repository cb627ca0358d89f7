"""BERT-large for real: `python -m benchmarks.scale --out benchmarks/scale/results`.

A BERT-large-shaped teacher (random weights: they change neither memory nor speed) on real
SST-2 text through the real commands, as bench.yaml lists them: `kdscale cache` in every
placement, `kdscale finetune` of the teacher under ZeRO-3, and `kdscale distill` of a
6-layer student under ZeRO-1, 2 and 3, from the cache and with the ZeRO-3 teacher online.
For each job: `kdscale env`'s memory prediction for that launch (taken first), the peak
resident memory of every rank, wall time, and what the job itself recorded (throughput and
parameters held per rank for the cache, step-time breakdowns for training). The caches of
every placement must be byte-identical. report.py writes the JSON, report.md and a plot.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from benchmarks.scale import report
from benchmarks.scale.jobs import (
    Launch,
    cache_results,
    job_env,
    predict,
    run,
    training_results,
)
from benchmarks.scale.teacher import save_teacher

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Path(__file__).resolve().parent / "bench.yaml"
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (JSON, md, png)")
    p.add_argument("--settings", type=Path, default=SETTINGS)
    p.add_argument("--work", type=Path, default=Path("runs/scale_bench"),
                   help="teacher, data, caches and runs (emptied first)")
    p.add_argument("--only", choices=["cache", "finetune", "distill"], nargs="+",
                   help="some stages (distill needs the zero3 cache of an earlier stage)")
    p.add_argument("--kdscale_src", type=Path, help="run the jobs with the kdscale package of "
                   "another checkout (a before-and-after measurement)")
    return p.parse_args(argv)


def prepare(settings: dict, work: Path) -> dict:
    """The data rows and the teacher, written once under `work`."""
    if not SST2.is_file():
        raise SystemExit(f"SST-2 not found at {SST2} (read from ../shared/data/sst2)")
    lines = SST2.read_text().splitlines()
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.tsv").write_text("\n".join(lines[:settings["rows"] + 1]) + "\n")
    vocabulary = save_teacher(work / "teacher", [line.split("\t", 1)[1] for line in lines[1:]],
                              settings["teacher_shape"])
    return {"rows": settings["rows"], "vocabulary": vocabulary}


def experiment(settings: dict, work: Path, name: str, **sections) -> Path:
    """The config of one job, in its own folder."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    config = {"output_dir": str(out), "seed": 0,
              "teacher": {"checkpoint": str(work / "teacher")},
              "data": {"train_file": str(work / "data" / "train.tsv"),
                       "text_column": "sentence", "label_column": "label",
                       "max_length": settings["max_length"]},
              "cache": {"dtype": "float32", "batch_size": settings["cache"]["batch_size"],
                        "shard_rows": settings["cache"]["shard_rows"]}}
    precision = settings.get("precision", "fp32")  # the teacher's, and both trainings'
    mixed = "no" if precision == "fp32" else precision
    config["teacher"]["precision"] = precision
    config["finetune"], config["distill"] = {"mixed_precision": mixed}, {"mixed_precision": mixed}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = out / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measured(command: str, config: Path, launch: Launch, work: Path, env: dict) -> dict:
    """A job's prediction, then the job."""
    plan = predict(config, launch, work, env)
    return {"processes": launch.processes, "zero_stage": launch.zero_stage, "plan": plan,
            **run(command, config, launch, work, env)}


def cache_stage(settings: dict, work: Path, env: dict) -> list[dict]:
    results = []
    for spec in settings["cache"]["runs"]:
        name = f"cache-{spec['placement']}-x{spec['processes']}"
        config = experiment(settings, work, name, teacher={"placement": spec["placement"]})
        job = measured("cache", config, Launch(spec["processes"]), work, env)
        results.append({"job": name, **job, "batch_size": settings["cache"]["batch_size"],
                        **cache_results(work / name / "cache")})
        print(report.job_line(results[-1]), flush=True)
    return results


def finetune_stage(settings: dict, work: Path, env: dict) -> list[dict]:
    spec = settings["finetune"]
    config = experiment(settings, work, "finetune",
                        teacher={"model": str(work / "teacher"),
                                 "checkpoint": str(work / "finetune" / "teacher")},
                        finetune={"max_steps": spec["steps"], "batch_size": spec["batch_size"],
                                  "log_every": max(spec["steps"] // 4, 1), "report_to": "none"})
    launch = Launch(spec["processes"], spec["zero_stage"])
    job = measured("finetune", config, launch, work, env)
    result = {"job": "finetune-zero3", **job,
              **training_results(work / "finetune" / "teacher")}
    print(report.job_line(result), flush=True)
    shutil.rmtree(work / "finetune" / "teacher")  # 1.3 GB of weights, not needed again
    return [result]


def distill_stage(settings: dict, work: Path, env: dict) -> list[dict]:
    spec, results = settings["distill"], []
    cache_dir = work / "cache-zero3-x2" / "cache"
    for run_spec in spec["runs"]:
        name = f"distill-zero{run_spec['zero_stage']}-{run_spec['source']}"
        teacher = {"source": run_spec["source"],
                   "placement": run_spec.get("teacher_placement", "replicate")}
        config = experiment(settings, work, name, teacher=teacher,
                            student={"layers": spec["layers"]}, cache={"dir": str(cache_dir)},
                            distill={"max_steps": spec["steps"],
                                     "batch_size": spec["batch_size"],
                                     "log_every": max(spec["steps"] // 4, 1),
                                     "report_to": "none"})
        job = measured("distill", config, Launch(spec["processes"], run_spec["zero_stage"]),
                       work, env)
        results.append({"job": name, **job, **training_results(work / name / "student")})
        print(report.job_line(results[-1]), flush=True)
    return results


STAGES = {"cache": cache_stage, "finetune": finetune_stage, "distill": distill_stage}


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = yaml.safe_load(args.settings.read_text())
    stages = args.only or list(STAGES)
    start = time.perf_counter()
    if "cache" in stages:
        shutil.rmtree(args.work, ignore_errors=True)
        setup = prepare(settings, args.work)
    else:
        setup = {"rows": settings["rows"], "vocabulary": "from the earlier run in --work"}
    env = job_env(args.kdscale_src)
    jobs = [job for stage in stages for job in STAGES[stage](settings, args.work, env)]
    results = report.build(settings, setup, jobs, args.kdscale_src,
                           total_s=time.perf_counter() - start, work=args.work)
    report.write(results, args.out)
    return results


if __name__ == "__main__":
    main()

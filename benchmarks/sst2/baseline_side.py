"""The baseline's side of the SST-2 benchmark: the plain recipe (baseline.py) as bench.yaml's
`baseline` section sets it, its teacher fine-tuned once, then for every seed a KD student of
the teacher's first K layers; with the controls, also a student of kdscale's layers where
they differ from the first K (so a difference in accuracy is not a choice of layers)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from benchmarks.sst2 import baseline
from benchmarks.sst2.evaluation import Evaluator, timed
from benchmarks.sst2.split import SOURCE_ROW, ids_sha256
from kdscale.config.model_fields import resolve_layers


@dataclass
class Teacher:
    """A fine-tuned teacher of the plain recipe, with the rows it read and its record."""

    model: object
    rows: baseline.TrainRows
    record: dict
    options: dict


def train_teacher(settings: dict, evaluator: Evaluator, options: dict) -> Teacher:
    """Timed from the start: loading the tokenizer and tokenizing are part of the pipeline."""
    hp, path = settings["baseline"], settings["experiment"]["data"]["train_file"]
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(settings["teacher_model"])
    rows = baseline.load_train(path, tokenizer, hp["max_length"], settings["max_train_examples"],
                               options["padding"])
    model, steps = baseline.finetune_teacher(settings["teacher_model"], rows, hp["finetune"],
                                             settings["experiment"]["seed"], options)
    record = evaluator.evaluate(model, time.perf_counter() - start, steps=steps)
    return Teacher(model, rows, record, options)


def student_run(evaluator: Evaluator, teacher: Teacher, hp: dict, options: dict,
                layers: list[int], seed: int, cached=None) -> dict:
    (model, steps), seconds = timed(baseline.distill_student, teacher.model, layers,
                                    teacher.rows, hp["distill"], seed, options, cached)
    return evaluator.evaluate(model, seconds, seed=seed, steps=steps,
                              train_rows=len(teacher.rows.data), teacher_layers=layers)


def kdscale_layers(spec: dict, teacher: Teacher) -> list[int]:
    return resolve_layers(spec["kdscale"], teacher.model.config.num_hidden_layers)


def run_baseline(settings: dict, evaluator: Evaluator) -> tuple[dict, Teacher]:
    hp = settings["baseline"]
    options = baseline.options_of(hp)
    if options["teacher"] != "online":
        raise SystemExit("baseline.teacher: the baseline side runs its teacher online; the "
                         "ablation's last step adds the cache")
    teacher = train_teacher(settings, evaluator, options)
    trained_on = teacher.rows.data.with_format(None)[SOURCE_ROW]
    out = {"teacher": teacher.record, "options": options, "students": {}, "controls_s": 0.0,
           "train_rows": len(trained_on), "train_rows_sha256": ids_sha256(trained_on)}
    for name, spec in settings["students"].items():
        runs = out["students"].setdefault(name, {}).setdefault("kd", [])
        for seed in settings["seeds"]:
            runs.append(student_run(evaluator, teacher, hp, options,
                                    list(range(spec["baseline"])), seed))
            report_run(name, "kd", runs[-1])
    if settings["run_controls"]:
        out["controls_s"] = same_layers_control(settings, evaluator, teacher, out)
    return out, teacher


def same_layers_control(settings: dict, evaluator: Evaluator, teacher: Teacher,
                        out: dict) -> float:
    """Students of kdscale's layers, where they are not the first K; returns the seconds."""
    start, hp = time.perf_counter(), settings["baseline"]
    for name, spec in settings["students"].items():
        layers = kdscale_layers(spec, teacher)
        if layers == list(range(spec["baseline"])):
            continue
        runs = out["students"][name].setdefault("kd_kdscale_layers", [])
        for seed in settings["seeds"]:
            runs.append(student_run(evaluator, teacher, hp, teacher.options, layers, seed))
            report_run(name, "kd_kdscale_layers", runs[-1])
    return time.perf_counter() - start


def report_run(name: str, kind: str, run: dict) -> None:
    print(f"baseline {name} {kind} seed {run['seed']}: accuracy {run['accuracy']:.4f} (test "
          f"{run['test']['accuracy']:.4f}) in {run['train_s']:.0f} s, {run['steps']} steps",
          flush=True)

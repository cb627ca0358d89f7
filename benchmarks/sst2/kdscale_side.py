"""kdscale's side of the SST-2 benchmark: `kdscale finetune` the teacher, `kdscale cache` once
(the labelled rows and their augmented copies, data.augment), then for every seed each student
of `students` with KD from the cache, and its controls:

    hard          hard labels only, on the labelled rows (a run that reads no teacher output)
    kd_no_copies  KD from a cache of the labelled rows alone (built once in its own folder,
                  timed apart and left out of the pipeline); with the controls only

Both controls take as many optimizer steps as their KD student: the KD student's extra steps
over its augmented copies would otherwise be an advantage the hard-label student never had.
Each stage runs in this process, timed from its start to its saved model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from benchmarks.sst2.evaluation import Evaluator, timed
from benchmarks.sst2.split import SOURCE_ROW, HeldOut, ids_sha256
from kdscale.commands.cache import run_cache
from kdscale.commands.distill import run_distill
from kdscale.commands.finetune import run_finetune
from kdscale.config import Config, config_from_dict
from kdscale.config.model_fields import resolve_layers
from kdscale.data.sources import load_raw
from kdscale.models import load_model, num_layers_of

# The bench.yaml sections each kind of student is built from, over `experiment`.
KIND_SECTIONS = {"kd": ("kd",), "hard": ("hard",), "kd_no_copies": ("kd", "kd_no_copies")}
CONTROL_KINDS = ("kd_no_copies",)  # run only with the controls


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


def kdscale_config(settings: dict, root: Path, run: str, *layers: dict) -> Config:
    """The experiment with the shared teacher and a cache under `root`, a run's own folder."""
    raw = merge(settings["experiment"], {"output_dir": str(root / run),
                                         "teacher": {"checkpoint": str(root / "teacher")},
                                         "cache": {"dir": str(root / "cache")}})
    for extra in layers:
        raw = merge(raw, extra)
    return config_from_dict(raw)


def step_matched(steps: int, rows: int, batch_size: int) -> dict:
    """Distill keys that train on `rows` for exactly `steps` optimizer steps: the epochs that
    many steps make (max_steps cuts the last one where it is not whole)."""
    return {"distill": {"epochs": steps / math.ceil(rows / batch_size), "max_steps": steps}}


def optimizer_steps(model_dir: Path) -> int:
    """The steps a saved model was trained for, from the training log saved beside it."""
    log = json.loads((model_dir / "training_log.json").read_text())
    return max(record["step"] for record in log)


def run_kdscale(settings: dict, root: Path, split: HeldOut) -> tuple[dict, Evaluator]:
    out, evaluator = teacher_and_cache(settings, root, split)
    kinds = ["kd", "hard"]
    if settings["run_controls"]:
        kinds.append("kd_no_copies")
        _, seconds = timed(run_cache, no_copies_cache_config(settings, root))
        out["cache_no_copies_s"] = round(seconds, 2)
        out["controls_s"] += seconds
    for seed in settings["seeds"]:  # seeds outermost: every kind of student early on
        for name, spec in settings["students"].items():
            runs = out["students"].setdefault(name, {})
            for kind in kinds:  # KD first: its controls take its number of steps
                kd_steps = runs["kd"][-1]["steps"] if kind != "kd" else None
                record, seconds = timed(kdscale_student, settings, root, evaluator,
                                        (name, spec, kind, seed), kd_steps, out["train_rows"])
                runs.setdefault(kind, []).append(record)
                out["controls_s"] += seconds if kind in CONTROL_KINDS else 0.0
    return out, evaluator


def teacher_and_cache(settings: dict, root: Path, split: HeldOut) -> tuple[dict, Evaluator]:
    """The teacher fine-tuned and cached, the evaluator, and the side's record so far."""
    teacher_cfg = kdscale_config(settings, root, "finetune",
                                 {"teacher": {"model": settings["teacher_model"]}})
    _, finetune_s = timed(run_finetune, teacher_cfg)
    _, cache_s = timed(run_cache, teacher_cfg)
    evaluator = Evaluator(teacher_cfg, split)
    teacher = load_model(teacher_cfg.teacher_dir, "teacher")
    labelled = load_raw(teacher_cfg.data, "train")[SOURCE_ROW]  # what finetune read
    steps = optimizer_steps(teacher_cfg.teacher_dir)
    return {"teacher": evaluator.evaluate(teacher, finetune_s, steps=steps),
            "cache_s": round(cache_s, 2), "train_rows": len(labelled),
            "train_rows_sha256": ids_sha256(labelled),
            "transfer_rows": cache_rows(root / "cache"), "students": {},
            "cache_bytes": sum(f.stat().st_size for f in (root / "cache").rglob("*")
                               if f.is_file()), "controls_s": 0.0}, evaluator


def cache_rows(cache_dir: Path) -> int:
    return json.loads((cache_dir / "manifest.json").read_text())["num_examples"]


def no_copies_cache_config(settings: dict, root: Path) -> Config:
    """The control's cache: the labelled rows alone, in their own folder."""
    return kdscale_config(settings, root, "cache_no_copies", settings["kd_no_copies"],
                          {"cache": {"dir": str(root / "cache_no_copies")}})


def kdscale_student(settings: dict, root: Path, evaluator: Evaluator, which: tuple,
                    kd_steps: int | None, labelled_rows: int) -> dict:
    """One student: `which` is (name, spec, kind, seed); a control (`kd_steps` given) trains
    on the labelled rows for as many optimizer steps as its KD student took."""
    name, spec, kind, seed = which
    run = f"{name}-{kind}-seed{seed}"
    layers = [settings[section] for section in KIND_SECTIONS[kind]] + [spec.get(kind, {})]
    layers.append({"seed": seed, "student": {"layers": spec["kdscale"]}})
    if kind == "kd_no_copies":
        layers.append({"cache": {"dir": str(root / "cache_no_copies")}})
    config = kdscale_config(settings, root, run, *layers)
    if kd_steps is not None:
        config = kdscale_config(settings, root, run, *layers,
                                step_matched(kd_steps, labelled_rows, config.distill.batch_size))
    _, seconds = timed(run_distill, config)
    student = load_model(config.student_dir, "student")
    rows = cache_rows(root / "cache") if kind == "kd" else labelled_rows
    metrics = evaluator.evaluate(
        student, seconds, seed=seed, steps=optimizer_steps(config.student_dir),
        epochs=config.distill.epochs, train_rows=rows,
        teacher_layers=resolve_layers(spec["kdscale"], num_layers_of(config.teacher_dir)))
    shutil.rmtree(config.student_dir)  # evaluated; the weights are not needed again
    print(f"kdscale {run}: accuracy {metrics['accuracy']:.4f} (test "
          f"{metrics['test']['accuracy']:.4f}) in {seconds:.0f} s, {metrics['steps']} steps",
          flush=True)
    return metrics

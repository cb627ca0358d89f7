"""Step time of a masked-LM student with its head on every position against the head on the
masked rows only (`kdscale.models.heads.head_on_rows`, what training runs):

    python -m benchmarks.mlm.head_rows --out benchmarks/mlm/results/head_rows.json

A MiniLM-shaped BertForMaskedLM (6 layers, hidden 384, 12 heads, BERT's 30,522-token
vocabulary; random weights, which change no time), a batch of 32 sequences of 128 tokens with
15% masked, and a training step (forward, CE over the masked rows, backward, AdamW). The two
ways alternate, the median of each is reported, with the device and the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from benchmarks.provenance import provenance
from kdscale.commands.report import device_name
from kdscale.models.heads import head_on_rows

SHAPE = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
         "num_attention_heads": 12, "intermediate_size": 1536}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--masked", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=5, help="steps of each way, alternated")
    return p.parse_args(argv)


def batch(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, SHAPE["vocab_size"], (args.batch, args.tokens), generator=g)
    masked = torch.rand(args.batch, args.tokens, generator=g) < args.masked
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "labels": labels, "rows": masked}


def step(model, optimizer, data: dict, rows_only: bool) -> float:
    start = time.perf_counter()
    rows = data["rows"]
    with head_on_rows(model, rows) if rows_only else contextlib.nullcontext():
        logits = model(input_ids=data["input_ids"]).logits
    logits = logits if rows_only else logits[rows]
    loss = torch.nn.functional.cross_entropy(logits, data["labels"][rows])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**SHAPE)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = batch(args)
    step(model, optimizer, data, True)  # warm-up: allocator, kernels
    step(model, optimizer, data, False)
    times = {"every position": [], "masked rows": []}
    for _ in range(args.repeats):
        times["every position"].append(step(model, optimizer, data, False))
        times["masked rows"].append(step(model, optimizer, data, True))
    median = {way: statistics.median(ms) for way, ms in times.items()}
    result = {"device": device_name(), **provenance(), "torch_threads": torch.get_num_threads(),
              "shape": SHAPE, "batch": args.batch, "tokens": args.tokens,
              "masked_rows": int(data["rows"].sum()), "step_ms": times, "median_ms": median,
              "speedup": median["every position"] / median["masked rows"]}
    print(f"{result['device']}, {args.batch} x {args.tokens} tokens, "
          f"{result['masked_rows']} masked rows; median of {args.repeats} steps")
    for way, ms in median.items():
        print(f"  head on {way:<15} {ms:8.1f} ms/step")
    print(f"  speedup {result['speedup']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

"""Benchmark of the logit cache: `python -m benchmarks.cache [--out FILE]`.

1. Throughput: kdscale's cache writer (plan, teacher forward, shard writes with checksums)
   against a plain `model(**batch)` loop over the same batches, in the same run, alternating
   the two so that both see the same machine state. Overhead = 1 - kdscale / plain.
2. Size: bytes on disk per masked position of a masked-LM top-k cache (k values, k indices,
   the position) against the full fp16 vocabulary row, from real shard files.

Prints a table and writes JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.provenance import provenance
from kdscale.cache import write_shard
from kdscale.commands.demo import build_demo_tokenizer, write_demo_task
from kdscale.commands.report import device_name
from kdscale.config import config_from_dict
from kdscale.data import PaddingCollator


def build_teacher(root: Path, hidden: int, layers: int) -> Path:
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
        max_position_embeddings=128, num_labels=2, id2label={0: "0", 1: "1"},
        label2id={"0": 0, "1": 1}))
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root / "teacher"


def plain_loop(job, runner) -> float:
    """The baseline: the same batches through `model(**batch)`, nothing kept."""
    collate = PaddingCollator(job.pad_token_id)
    start = time.perf_counter()
    for shard in range(len(job.plan.shards)):
        for rows in job.plan.batches(shard, job.config.cache.batch_size):
            runner.logits(collate(job.data.rows(rows)))
    return time.perf_counter() - start


def kdscale_loop(config, runner, state) -> float:
    """What `kdscale cache` does around the teacher's forward, all timed: the plan (the data's
    tokenized rows, the weights' hash, the shard plan), the shards with their checksums, and
    the manifest that finalizes the cache."""
    from kdscale.cache import clear_partial, finalize_cache
    from kdscale.commands.cache import plan_job, write_shards

    clear_partial(config.cache_dir)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    job = plan_job(config, state)
    write_shards(job, runner, list(range(len(job.plan.shards))), state)
    finalize_cache(job.directory, num_shards=len(job.plan.shards), plan_id=job.plan_id,
                   **job.meta)
    return time.perf_counter() - start


def throughput(args, root: Path) -> dict:
    from kdscale.commands.cache import plan_job
    from kdscale.distributed import process_state
    from kdscale.teacher import load_runner

    files = write_demo_task(root / "data", n_train=args.examples, n_eval=10)
    config = config_from_dict({
        "output_dir": str(root), "data": {"train_file": str(files["train"])},
        "teacher": {"checkpoint": str(build_teacher(root, args.hidden, args.layers)),
                    "placement": "replicate"},
        "cache": {"batch_size": args.batch_size, "shard_rows": 1024}})
    state = process_state()
    job = plan_job(config, state)
    runner = load_runner(config, state, config.cache.batch_size)
    plain_loop(job, runner)  # warm-up: allocator, kernels, caches
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(job, runner))
        ours.append(kdscale_loop(config, runner, state))
    plain_s, ours_s = statistics.median(plain), statistics.median(ours)
    return {"examples": args.examples, "batch_size": args.batch_size, "hidden": args.hidden,
            "layers": args.layers, "plain_s": plain_s, "kdscale_s": ours_s,
            "plain_ex_per_s": args.examples / plain_s, "kdscale_ex_per_s": args.examples / ours_s,
            "overhead": ours_s / plain_s - 1}


def topk_sizes(root: Path, vocab: int, rows: int, ks: list[int]) -> list[dict]:
    """Bytes per masked position on disk: top-k shards against a dense fp16 shard."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator)  # (rows, V) one per masked position
    ids = torch.arange(rows) // 4  # 4 masked positions per example
    positions = (torch.arange(rows) % 4 + 1).int()
    dense_dir = root / "dense"
    # A dense cache of the same rows: one row per (example, position), so ids are row numbers.
    dense = write_shard(dense_dir, 0, example_ids=torch.arange(rows), logits=logits,
                        dtype="float16",
                        num_outputs=vocab, plan_id="bench-dense")
    results = []
    for k in ks:
        values, indices = logits.topk(k, dim=-1)
        info = write_shard(root / f"top{k}", 0, example_ids=ids, values=values,
                           indices=indices.int(), positions=positions, dtype="float16",
                           num_outputs=vocab, k=k, plan_id=f"bench-top{k}")
        results.append({"k": k, "vocab": vocab, "dense_bytes_per_position": dense["bytes"] / rows,
                        "topk_bytes_per_position": info["bytes"] / rows,
                        "ratio": dense["bytes"] / info["bytes"]})
    return results


def verify_cost(root: Path, mib: int, vocab: int = 30522, shard_rows: int = 2048) -> dict:
    """What `cache.verify` costs before a distill run: a cache of `mib` MiB of fp16 logits
    (cold files are slower; these were just written, as on a node that built its cache),
    read once for its checksums alone (the floor: every byte must be read) and once for
    checksums and finite values (what distill does)."""
    from kdscale.cache import finalize_cache
    from kdscale.cache.verify import damaged_shards
    from kdscale.files import sha256_file

    rows = max(1, mib * 2**20 // (2 * vocab))
    generator = torch.Generator().manual_seed(0)
    directory = root / "verify"
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        write_shard(directory, index, example_ids=torch.arange(start, start + n),
                    logits=torch.randn(n, vocab, generator=generator), dtype="float16",
                    num_outputs=vocab, plan_id="bench-verify")
    manifest = finalize_cache(directory, num_shards=index + 1, plan_id="bench-verify",
                              kind="dense", num_outputs=vocab, k=None, dtype="float16",
                              teacher={}, tokenizer_sha256=None, data_fingerprint="bench")
    size = sum(s["bytes"] for s in manifest.shards)
    start = time.perf_counter()
    for shard in manifest.shards:
        sha256_file(directory / shard["file"])
    checksums_s = time.perf_counter() - start
    start = time.perf_counter()
    if damaged_shards(directory, manifest):
        raise RuntimeError(f"the benchmark's own cache at {directory} reads as damaged")
    verify_s = time.perf_counter() - start
    gib = size / 2**30
    return {"bytes": size, "shards": len(manifest.shards), "checksums_s_per_gib": checksums_s / gib,
            "verify_s_per_gib": verify_s / gib}


def print_tables(result: dict) -> None:
    t = result["throughput"]
    print(f"\ncache throughput on {result['device']} ({t['examples']} examples, batch "
          f"{t['batch_size']}, BERT hidden {t['hidden']} x {t['layers']} layers)")
    print(f"{'path':>26}  {'seconds':>8}  {'examples/s':>10}")
    print(f"{'plain model(**batch) loop':>26}  {t['plain_s']:8.2f}  {t['plain_ex_per_s']:10.1f}")
    print(f"{'kdscale cache writer':>26}  {t['kdscale_s']:8.2f}  {t['kdscale_ex_per_s']:10.1f}")
    print(f"kdscale overhead: {t['overhead']:+.1%}")
    v = result["verify"]
    print(f"\ncache.verify on {v['bytes'] / 2**20:.0f} MiB in {v['shards']} shards: "
          f"{v['verify_s_per_gib']:.2f} s per GiB (checksums and finite values), against "
          f"{v['checksums_s_per_gib']:.2f} s per GiB for the checksums alone")
    print(f"\n{'k':>4}  {'dense fp16 B/pos':>16}  {'top-k B/pos':>11}  {'smaller':>8}")
    for row in result["topk"]:
        print(f"{row['k']:>4}  {row['dense_bytes_per_position']:16.0f}  "
              f"{row['topk_bytes_per_position']:11.1f}  {row['ratio']:7.0f}x")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--verify_mib", type=int, default=512, help="cache size for the "
                        "cache.verify measurement")
    parser.add_argument("--out", default="runs/bench/cache.json", help="JSON results file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": device_name(), "torch": torch.__version__, **provenance(),
                  "threads": torch.get_num_threads(),
                  "throughput": throughput(args, Path(tmp)),
                  "topk": topk_sizes(Path(tmp), args.vocab, rows=256, ks=[32, 64]),
                  "verify": verify_cost(Path(tmp), args.verify_mib, args.vocab)}
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nresults written to {out}")
    return result



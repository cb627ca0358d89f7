"""A BERT-large cache of a 3.3B-token corpus (BERT's own: BooksCorpus and English Wikipedia)
on N GPUs, on paper: the measured figures of this run where they apply, stated assumptions
where they do not. Each limit is a time; the largest says where scaling stops.

Measured here: the teacher's size, the cache's bytes per row of each kind, the tokens per
row, the CPU's forward cost per token and layer (replicated, one process), and the extra
time a ZeRO-3 teacher spends per forward against a replicated one (its parameter gathers)
for the bytes it gathers. Assumed (ASSUMED below): the GPUs' sustained speed, the storage's
and network's bandwidths, and the masked-LM recipe of the general distillation."""

from __future__ import annotations

ASSUMED = {
    "corpus_tokens": 3.3e9,
    "gpu_flops": 4.0e14,  # an H100 at ~40% of its 989 TFLOP/s dense bf16, short sequences
    "gpus_per_node": 8,
    "node_write_bytes_s": 2.0e9,  # local NVMe per node
    "shared_fs_write_bytes_s": 2.0e10,  # the cluster file system's aggregate write
    "inter_node_bytes_s_per_gpu": 400e9 / 8 / 8,  # 400 Gb/s per node, 8 GPUs sharing it
    "masked_share": 0.15,  # BERT's masking rate: cached rows per token (MLM top-k)
    "topk_row_bytes": 6 * 64 + 12,  # top-64, fp16 values, int32 indices, position and id
    "tokens_per_batch": 128 * 128,  # a forward batch of 128 sequences of 128 tokens
}
NODES = [8, 64, 512]


def _job(jobs: list[dict], name: str) -> dict | None:
    return next((j for j in jobs if j["job"] == name), None)


def _per_example_s(job: dict) -> float:
    return max(r["seconds"] for r in job["ranks"]) / sum(r["examples"] for r in job["ranks"])


def measured(jobs: list[dict]) -> dict | None:
    one, two, sharded = (_job(jobs, f"cache-{p}") for p in
                         ("replicate-x1", "replicate-x2", "zero3-x2"))
    if one is None:
        return None
    layers = one["plan"]["sizes"]["teacher_layers"]
    out = {"params": one["num_params"], "layers": layers,
           "cpu_s_per_example_layer": _per_example_s(one) / layers}
    if two and sharded:
        world = sharded["processes"]
        batches = max(r["examples"] for r in sharded["ranks"]) / sharded["batch_size"]
        gathered = batches * one["num_params"] * 4 * (world - 1) / world  # fp32, per process
        extra_s = max(r["seconds"] for r in sharded["ranks"]) - \
            max(r["seconds"] for r in two["ranks"])
        out["zero3_gather_bytes_s"] = gathered / extra_s if extra_s > 0 else None
    return out


def limits(n_gpus: int, params: int) -> dict[str, float]:
    """Hours each resource needs for the corpus on n GPUs."""
    a = ASSUMED
    flops = a["corpus_tokens"] * 2 * params  # a forward: 2 FLOPs per parameter per token
    rows_bytes = a["corpus_tokens"] * a["masked_share"] * a["topk_row_bytes"]
    nodes = max(n_gpus // a["gpus_per_node"], 1)
    write_bw = min(nodes * a["node_write_bytes_s"], a["shared_fs_write_bytes_s"])
    batches = a["corpus_tokens"] / a["tokens_per_batch"] / n_gpus
    gather = batches * params * 2 * (n_gpus - 1) / n_gpus  # bf16 weights, ZeRO-3 only
    return {"compute": flops / (n_gpus * a["gpu_flops"]) / 3600,
            "storage": rows_bytes / write_bw / 3600,
            "network_zero3": gather / a["inter_node_bytes_s_per_gpu"] / 3600,
            "cache_gb": rows_bytes / 1e9}


def extrapolate(jobs: list[dict]) -> dict:
    m = measured(jobs)
    if m is None:
        return {"lines": ["(no single-process replicated cache run: nothing to extrapolate)"]}
    rows = {n: limits(n, m["params"]) for n in NODES}
    lines = [f"Measured: {m['params']:,} parameters in {m['layers']} layers; this CPU's "
             f"forward takes {m['cpu_s_per_example_layer'] * 1e3:.2f} ms per example and layer"
             + (f"; a ZeRO-3 teacher gathered parameters at "
                f"{m['zero3_gather_bytes_s'] / 1e9:.2f} GB/s over gloo"
                if m.get("zero3_gather_bytes_s") else "") + ".",
             "Assumed: " + ", ".join(f"{k} = {v:g}" for k, v in ASSUMED.items()) + ".", "",
             "| GPUs | compute h | storage h (MLM top-64 rows) | network h (ZeRO-3 only) | "
             "bound (replicated teacher) |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        bound = "compute" if r["compute"] >= r["storage"] else "storage"
        lines.append(f"| {n} | {r['compute']:.2f} | {r['storage']:.2f} | "
                     f"{r['network_zero3']:.2f} | {bound} |")
    lines += ["", f"The cache holds {rows[NODES[0]]['cache_gb']:.0f} GB. BERT-large (1.3 GB in "
              "fp32) fits any of these GPUs, so the teacher is replicated and needs no network "
              "while caching; ZeRO-3's gathers would add the network column. Compute falls as "
              "1/N while writes are capped by the shared file system: where the storage column "
              "passes the compute column, more GPUs stop helping."]
    return {"measured": m, "assumed": ASSUMED, "hours": rows, "lines": lines}

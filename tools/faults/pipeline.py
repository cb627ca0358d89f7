"""A tiny experiment for the fault harness: demo data, a seeded random teacher, and one
experiment file per job, built in seconds so that many jobs can be started and killed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from kdscale.commands.demo import build_demo_tokenizer, write_demo_task

EXAMPLES = 384  # cache rows: 24 shards of 16, so a kill can land between many shard writes
SHARD_ROWS = 16
STEPS = 24  # distill steps, a checkpoint every 2: a kill can land in many checkpoint saves
CHECKPOINT_EVERY = 2


def build_pipeline(root: Path) -> Path:
    """<root>/data and <root>/teacher; returns the teacher directory."""
    write_demo_task(root / "data", n_train=EXAMPLES, n_eval=16)
    tokenizer = build_demo_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
            num_attention_heads=2, intermediate_size=512, max_position_embeddings=64,
            num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1}))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root / "teacher"


def write_experiment(root: Path, run: Path, cache: Path, keep: int = 2,
                     placement: str = "replicate") -> Path:
    """The experiment of one job: outputs under `run`, logits in `cache` (a distill job
    reads a finished cache; a cache job writes it). `keep`: checkpoints kept; `placement`:
    how a cache job's processes hold the teacher (replicated, or ZeRO-3 shards)."""
    config = {
        "output_dir": str(run), "seed": 0,
        "teacher": {"checkpoint": str(root / "teacher"), "placement": placement},
        "student": {"layers": [0], "dropout": 0.0},
        "data": {"train_file": str(root / "data" / "train.jsonl"),
                 "eval_file": str(root / "data" / "dev.jsonl"), "max_length": 64},
        "cache": {"dir": str(cache), "shard_rows": SHARD_ROWS, "batch_size": 8},
        "distill": {"max_steps": STEPS, "batch_size": 4, "checkpoint_every": CHECKPOINT_EVERY,
                    "keep_checkpoints": keep, "log_every": 2, "report_to": "none",
                    "learning_rate": 1e-3, "warmup_ratio": 0.0},
    }
    path = run.with_suffix(".json")  # JSON is YAML
    run.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path

"""A tiny finished pipeline built in this process (teacher, cache, a checkpointed student run),
wrong inputs made from it, and a snapshot of every file, to prove nothing was changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformers import BertConfig, BertForSequenceClassification

from kdscale.cache import CacheWriter
from kdscale.commands.demo import build_demo_tokenizer, write_demo_task
from kdscale.config import load_config

POSITIONS = 32  # the teacher's max_position_embeddings


def build_pipeline(root: Path) -> Path:
    """<root>/data, teacher/, cache/ and run/ (a 2-step distill run with checkpoints)."""
    from kdscale.commands.cache import run_cache
    from kdscale.commands.distill import run_distill

    write_demo_task(root / "data", n_train=48, n_eval=16)
    tokenizer = build_demo_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=POSITIONS,
            num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1}))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    config = write_experiment(root, root / "experiment.yaml")
    run_cache(load_config(config))
    run_distill(load_config(config))
    return config


def experiment(root: Path, **sections) -> dict:
    """The pipeline's experiment as a dict, with some sections' keys replaced."""
    raw = {"output_dir": str(root / "run"), "seed": 0,
           "teacher": {"checkpoint": str(root / "teacher"), "placement": "replicate"},
           "student": {"layers": [0], "dropout": 0.0},
           "data": {"train_file": str(root / "data" / "train.jsonl"),
                    "eval_file": str(root / "data" / "dev.jsonl"), "max_length": POSITIONS},
           "cache": {"dir": str(root / "cache"), "shard_rows": 16, "batch_size": 16},
           "distill": {"max_steps": 2, "batch_size": 8, "checkpoint_every": 1,
                       "report_to": "none", "log_every": 1},
           "eval": {"batch_size": 8, "latency_batches": 1}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def write_experiment(root: Path, path: Path, **sections) -> Path:
    path.write_text(json.dumps(experiment(root, **sections)))  # JSON is YAML
    return path


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256 (or link target, or 'dir')} of every entry under `roots`."""
    entries = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                entries[str(path)] = "-> " + str(path.readlink())
            elif path.is_dir():
                entries[str(path)] = "dir"
            else:
                entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def run_command(command: str, config: Path, overrides: list[str] | None = None):
    """What `kdscale <command> --config <config> <overrides>` runs, in this process."""
    from kdscale.commands.cache import run_cache
    from kdscale.commands.distill import run_distill
    from kdscale.commands.evaluate import run_eval
    from kdscale.commands.finetune import run_finetune

    commands = {"cache": run_cache, "distill": run_distill, "eval": run_eval,
                "finetune": run_finetune, "config": lambda config: config}
    return commands[command](load_config(config, overrides or []))


def resave_teacher(source: Path, target: Path, change) -> Path:
    """A copy of the teacher with `change(model)` applied to its weights."""
    model = BertForSequenceClassification.from_pretrained(source)
    with torch.no_grad():
        change(model)
    model.save_pretrained(target)
    build_demo_tokenizer().save_pretrained(target)
    return target


def edit_manifest(cache: Path, **fields) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(fields)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(cache: Path, index: int, data: bytes) -> None:
    """Replaces a shard's bytes and records them in the manifest, as a consistent (but not
    kdscale-written) cache would."""
    name = f"shard-{index:05d}.safetensors"
    (cache / name).write_bytes(data)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][index].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (cache / "manifest.json").write_text(json.dumps(manifest))


def edit_launch(run: Path, step: int, **launch) -> Path:
    """Rewrites the launch a checkpoint of `run` records (as another launch would have)."""
    state_file = run / "checkpoints" / "distill" / f"step-{step:08d}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["launch"].update(launch)
    state_file.write_text(json.dumps(state))
    return state_file


def set_(key: str, value):
    """A weight change for resave_teacher: parameter `key` filled with `value`."""
    def change(model):
        dict(model.named_parameters())[key].fill_(value)
    return change


def topk_cache(p: Path, tmp: Path):
    """A consistent top-k cache of the pipeline's examples (one slot per row)."""
    meta = json.loads((p / "cache" / "manifest.json").read_text())
    with CacheWriter(tmp / "topk", kind="topk", k=1, num_outputs=2, teacher=meta["teacher"],
                     tokenizer_sha256=meta["tokenizer_sha256"],
                     data_fingerprint=meta["data_fingerprint"]) as writer:
        writer.add(torch.arange(48), values=torch.ones(48, 1), indices=torch.zeros(48, 1).int())
    return {"cache": {"dir": str(tmp / "topk")}}, []


def nan_logits(cache: Path) -> None:
    """Every teacher logit of the pipeline's 3 shards set to NaN, the manifest kept consistent."""
    for index in range(3):
        shard = load_file(cache / f"shard-{index:05d}.safetensors")
        shard["logits"] = torch.full_like(shard["logits"], float("nan"))
        rewrite_shard(cache, index, save(shard))


def damaged_state(run: Path) -> None:
    (run / "checkpoints" / "distill" / "step-00000002" / "trainer_state.json").write_text("{")

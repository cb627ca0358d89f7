"""`kdscale cache` over real processes: 2 ranks with a ZeRO-3 teacher, a rank killed and the
job resumed, and one process with a replicated teacher. Every run must give the same cache,
byte for byte (two "machines" on loopback: tests/test_launch.py's SLURM cache job)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdscale.cache import LogitCache, read_manifest
from kdscale.commands.demo import build_demo_tokenizer, write_demo_task
from kdscale.data import PaddingCollator, tokenize_labelled
from kdscale.data.batch import model_inputs
from kdscale.distributed import free_port
from tests.support.pipeline import worker_of_rank

EXAMPLES = 400
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict:
    """A small fine-tuned-looking teacher, its tokenizer and a training file."""
    root = tmp_path_factory.mktemp("cache_job")
    files = write_demo_task(root / "data", n_train=EXAMPLES, n_eval=10)
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=2,
        id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1}))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return {"root": root, "teacher": root / "teacher", "train": files["train"]}


def write_config(experiment: dict, name: str, **cache) -> Path:
    config = {"output_dir": str(experiment["root"] / name),
              "teacher": {"checkpoint": str(experiment["teacher"]), "placement": "zero3"},
              "data": {"train_file": str(experiment["train"]), "max_length": 64},
              "cache": {"dir": str(experiment["root"] / name / "cache"), "shard_rows": 32,
                        "batch_size": 8, **cache}}
    path = experiment["root"] / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def launch_cache(config: Path, processes: int = 2, **popen) -> subprocess.Popen:
    command = [*LAUNCH, "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(free_port()),
               "-m", "kdscale", "cache", "--config", str(config)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def shard_digests(cache_dir: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in read_manifest(cache_dir).shards]


@pytest.fixture(scope="module")
def two_rank_cache(experiment) -> Path:
    config = write_config(experiment, "two_ranks")
    finish(launch_cache(config))
    return experiment["root"] / "two_ranks" / "cache"


def test_two_ranks_with_a_zero3_teacher(experiment, two_rank_cache):
    cache = LogitCache(two_rank_cache)
    assert torch.equal(cache.example_ids(), torch.arange(EXAMPLES))  # each id exactly once
    tokenizer = build_demo_tokenizer()
    teacher = BertForSequenceClassification.from_pretrained(experiment["teacher"]).eval()
    config = json.loads((experiment["root"] / "two_ranks.yaml").read_text())
    from kdscale.config import config_from_dict

    data = tokenize_labelled(config_from_dict(config).data, tokenizer, "train", ["0", "1"])
    ids = [3, 150, 399, 0]
    batch = PaddingCollator(tokenizer.pad_token_id)([data.dataset[i] for i in ids])
    with torch.no_grad():
        expected = teacher(**model_inputs(batch)).logits
    torch.testing.assert_close(cache.get(batch["example_id"]).float(), expected,
                               atol=2e-3, rtol=1e-3)  # fp16 storage
    build = json.loads((two_rank_cache / "build.json").read_text())
    assert build["placement"] == "zero3" and build["world_size"] == 2
    for rank in build["ranks"]:  # each rank held about half of the teacher
        assert 0.4 < rank["params_held"] / build["num_params"] < 0.6
    assert sum(rank["examples"] for rank in build["ranks"]) == EXAMPLES


def test_a_killed_rank_resumes_to_the_same_cache(experiment, two_rank_cache):
    config = write_config(experiment, "killed")
    cache_dir = experiment["root"] / "killed" / "cache"
    process = launch_cache(config)
    launcher = psutil.Process(process.pid)
    deadline = time.time() + 240
    while len(list(cache_dir.glob("shard-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    victim = worker_of_rank(launcher, 1)
    assert victim is not None, "rank 1 was not found"
    victim.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (cache_dir / "manifest.json").exists(), "the job finished before the kill"
    out = finish(launch_cache(config))
    finished_before = int(out.split(" already finished")[0].rsplit(", ", 1)[1])
    assert finished_before >= 2
    assert shard_digests(cache_dir) == shard_digests(two_rank_cache)


def test_one_process_with_a_replicated_teacher_writes_the_same_cache(experiment,
                                                                      two_rank_cache):
    config = write_config(experiment, "one_process")
    config_text = json.loads(config.read_text())
    config_text["teacher"]["placement"] = "replicate"
    config.write_text(json.dumps(config_text))
    result = subprocess.run([sys.executable, "-m", "kdscale", "cache", "--config", str(config)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher placement: replicate" in result.stdout
    assert shard_digests(experiment["root"] / "one_process" / "cache") == \
        shard_digests(two_rank_cache)

"""`kdscale cache` over real processes and machines: two "machines" on loopback (two
`accelerate launch` invocations of 1 process each, `--num_machines 2`) holding a ZeRO-3
teacher, a 2-process job with a rank killed and resumed, and one process with a replicated
teacher. Each must give the one-process cache, byte for byte (docs/cache.md)."""

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
from kdscale.cache.format import MANIFEST_NAME
from kdscale.commands.demo import build_demo_tokenizer, write_demo_task
from kdscale.data import PaddingCollator, tokenize_labelled
from kdscale.data.batch import model_inputs
from kdscale.distributed import free_port
from tests.support.pipeline import worker_of_rank

pytestmark = pytest.mark.slow  # real launches: scheduled first (tests/conftest.py)

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


def launch_machine(config: Path, machine_rank: int, port: int) -> subprocess.Popen:
    """What one of two machines runs: 1 process of a 2-process world, meeting the other
    machine's process at the rendezvous machine 0 hosts (here on loopback)."""
    command = [*LAUNCH, "--num_processes", "2", "--num_machines", "2",
               "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port),
               "-m", "kdscale", "cache", "--config", str(config)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def shard_digests(cache_dir: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in read_manifest(cache_dir).shards]


def cache_bytes(cache_dir: Path) -> dict[str, bytes]:
    """Every file a reader trusts: the manifest and the shards it lists (build.json, which
    records the launch and what each process did, is the one file meant to differ)."""
    names = [MANIFEST_NAME, *(name for name, _ in shard_digests(cache_dir))]
    return {name: (cache_dir / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def one_process_cache(experiment) -> Path:
    """The reference: one plain process (no launcher) with a replicated teacher."""
    config = write_config(experiment, "one_process")
    config_text = json.loads(config.read_text())
    config_text["teacher"]["placement"] = "replicate"
    config.write_text(json.dumps(config_text))
    result = subprocess.run([sys.executable, "-m", "kdscale", "cache", "--config", str(config)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher placement: replicate" in result.stdout
    return experiment["root"] / "one_process" / "cache"


@pytest.fixture(scope="module")
def two_machine_cache(experiment) -> Path:
    """Two machines on loopback, 1 process each, sharing a ZeRO-3 teacher: each holds half of
    its weights and gathers the other half from the other machine for every layer."""
    config = write_config(experiment, "two_machines")
    port = free_port()
    machines = [launch_machine(config, rank, port) for rank in (0, 1)]
    for machine in machines:
        finish(machine)
    return experiment["root"] / "two_machines" / "cache"


def test_two_machines_write_the_one_process_cache_byte_for_byte(two_machine_cache,
                                                                  one_process_cache):
    ours, theirs = cache_bytes(two_machine_cache), cache_bytes(one_process_cache)
    assert len(ours) == 1 + -(-EXAMPLES // 32)  # the manifest and the plan's shards of 32 rows
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], f"{name} differs from the one-process cache"
    build = json.loads((two_machine_cache / "build.json").read_text())
    assert build["world_size"] == 2  # one world over both machines, not two jobs of one


def test_two_ranks_with_a_zero3_teacher(experiment, two_machine_cache):
    cache = LogitCache(two_machine_cache)
    assert torch.equal(cache.example_ids(), torch.arange(EXAMPLES))  # each id exactly once
    tokenizer = build_demo_tokenizer()
    teacher = BertForSequenceClassification.from_pretrained(experiment["teacher"]).eval()
    config = json.loads((experiment["root"] / "two_machines.yaml").read_text())
    from kdscale.config import config_from_dict

    data = tokenize_labelled(config_from_dict(config).data, tokenizer, "train", ["0", "1"])
    ids = [3, 150, 399, 0]
    batch = PaddingCollator(tokenizer.pad_token_id)([data.dataset[i] for i in ids])
    with torch.no_grad():
        expected = teacher(**model_inputs(batch)).logits
    torch.testing.assert_close(cache.get(batch["example_id"]).float(), expected,
                               atol=2e-3, rtol=1e-3)  # fp16 storage
    build = json.loads((two_machine_cache / "build.json").read_text())
    assert build["placement"] == "zero3" and build["world_size"] == 2
    for rank in build["ranks"]:  # each rank held about half of the teacher
        assert 0.4 < rank["params_held"] / build["num_params"] < 0.6
    assert sum(rank["examples"] for rank in build["ranks"]) == EXAMPLES


def test_a_killed_two_process_job_is_finished_by_one_process(experiment, one_process_cache):
    """2 processes on one machine (ZeRO-3 teacher), rank 1 killed after 2 shards; the rerun
    has one process (the shard plan does not depend on the number): it keeps the finished
    shards, writes the rest, and the cache is the one-process cache."""
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
    out = finish(subprocess.Popen([sys.executable, "-m", "kdscale", "cache", "--config",
                                   str(config)], env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    assert "1 process(es)" in out
    finished_before = int(out.split(" already finished")[0].rsplit(", ", 1)[1])
    assert finished_before >= 2
    assert shard_digests(cache_dir) == shard_digests(one_process_cache)

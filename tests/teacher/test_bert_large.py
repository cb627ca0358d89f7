"""The headline path at its true size: a BERT-large-shaped teacher (335M parameters) cached
by 2 real processes under ZeRO-3 holds about half the parameters per process and writes the
bytes a replicated teacher writes. About a minute and a half on 2 CPU cores (1.3 GB of
weights are written, then loaded by each process), so it is left out of the default run:
`python -m pytest -m large` runs it."""

from __future__ import annotations

import json

import pytest

from benchmarks.scale.teacher import save_teacher
from tests.support.pipeline import accelerate_launch
from tests.support.sst2 import TRAIN

pytestmark = [pytest.mark.slow, pytest.mark.large, pytest.mark.usefixtures("sst2")]
ROWS = 32


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_large")
    lines = TRAIN.read_text().splitlines()
    (root / "train.tsv").write_text("\n".join(lines[:ROWS + 1]) + "\n")
    save_teacher(root / "teacher", [line.split("\t", 1)[1] for line in lines[1:]])
    return root


def cache_build(root, placement: str) -> dict:
    out = root / placement
    out.mkdir()
    config = {"output_dir": str(out),
              "teacher": {"checkpoint": str(root / "teacher"), "placement": placement},
              "data": {"train_file": str(root / "train.tsv"), "text_column": "sentence",
                       "label_column": "label", "max_length": 64},
              "cache": {"dtype": "float32", "batch_size": 8, "shard_rows": 8}}
    (out / "experiment.yaml").write_text(json.dumps(config))
    result = accelerate_launch("-m", "kdscale", "cache", "--config", str(out / "experiment.yaml"),
                               timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    build = json.loads((out / "cache" / "build.json").read_text())
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    return {**build, "shards": [shard["sha256"] for shard in manifest["shards"]]}


def test_zero3_holds_half_the_teacher_per_process_and_caches_the_same_bytes(experiment):
    replicated = cache_build(experiment, "replicate")
    sharded = cache_build(experiment, "zero3")
    assert replicated["num_params"] > 330_000_000  # BERT-large's size, the embeddings included
    assert all(rank["params_held"] == replicated["num_params"] for rank in replicated["ranks"])
    for rank in sharded["ranks"]:
        assert rank["params_held"] <= 0.55 * sharded["num_params"], rank
    assert sum(rank["params_held"] for rank in sharded["ranks"]) >= sharded["num_params"]
    assert sharded["shards"] == replicated["shards"]

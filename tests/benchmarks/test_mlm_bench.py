"""The masked-LM benchmark end to end at a toy size: real SST-2 sentences, the tiny BERT of
the SST-2 benchmark's test standing in for MiniLM. Checks what the report rests on; no
accuracy or timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.sst2 import REPO, tiny_pretrained_bert

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI
TRAIN_ROWS, DEV_ROWS = 64, 32


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mlm_bench")
    teacher = tiny_pretrained_bert(root / "pretrained")
    command = [sys.executable, "-m", "benchmarks.mlm", "--out", str(root / "out"), "--work",
               str(root / "work"), "--teacher_model", str(teacher), "--max_train_examples",
               str(TRAIN_ROWS), "--teacher_train_examples", str(TRAIN_ROWS),
               "--max_eval_examples", str(DEV_ROWS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)  # a safety net on a busy machine, not a limit
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "out" / "report.md").read_text().count("| student,") == 2
    return json.loads((root / "out" / "results.json").read_text())


def test_every_model_is_scored_on_the_same_masked_tokens(results):
    models = [results["teacher"], *results["students"].values()]
    assert len(models) == 3
    assert len({m["masked_tokens"] for m in models}) == 1 and models[0]["masked_tokens"] > 0
    assert all(m["examples"] == DEV_ROWS and 0 <= m["accuracy"] <= 1 for m in models)
    assert results["cache"]["examples"] == TRAIN_ROWS
    assert results["cache"]["rows"] >= TRAIN_ROWS  # at least one masked token per sentence


def test_truncation_is_measured_for_each_k(results):
    rows = results["truncation"]
    assert [r["k"] for r in rows] == [8, 32, 128]
    masses = [r["teacher_mass"] for r in rows]
    assert 0 < masses[0] < masses[1] < masses[2] <= 1  # more slots hold more probability
    assert len({r["soft_loss_full"] for r in rows}) == 1  # one full-teacher reference
    # fp16 values and uint16 indices (the tiny BERT's vocabulary fits), a position and an id
    assert all(r["bytes_per_position"] == 4 * r["k"] + 12 for r in rows)


def test_results_name_no_path_of_the_machine(results):
    data = results["settings"]["experiment"]["data"]
    assert data["train_file"] == "../shared/data/sst2/train.tsv"
    assert results["device"]

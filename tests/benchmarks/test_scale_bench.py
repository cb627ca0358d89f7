"""The scale benchmark's harness at toy size (a 4-layer teacher, a few rows): each job is a
real launch, measured per rank and set against `kdscale env`'s prediction for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.support.sst2 import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("sst2")]
TOY = {"rows": 24, "max_length": 32,
       "teacher_shape": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                         "intermediate_size": 64, "max_position_embeddings": 64},
       "cache": {"batch_size": 8, "shard_rows": 8,
                 "runs": [{"placement": "replicate", "processes": 1},
                          {"placement": "zero3", "processes": 2}]},
       "finetune": {"zero_stage": 3, "processes": 2, "steps": 2, "batch_size": 4},
       "distill": {"layers": "first:2", "processes": 2, "steps": 2, "batch_size": 4,
                   "runs": [{"zero_stage": 2, "source": "cache"}]}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    (root / "bench.yaml").write_text(yaml.safe_dump(TOY))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--settings",
                           str(root / "bench.yaml"), "--work", str(root / "work"), "--out",
                           str(root / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # a safety net on a busy machine
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


def test_every_job_is_measured_per_rank_and_predicted(results):
    report = json.loads((results / "results.json").read_text())
    assert report["device"] and "commit" in report
    jobs = {job["job"]: job for job in report["jobs"]}
    assert list(jobs) == ["cache-replicate-x1", "cache-zero3-x2",
                          "finetune-zero3", "distill-zero2-cache"]
    for job in jobs.values():
        assert len(job["peak_rss"]) == job["processes"] and min(job["peak_rss"]) > 0
        assert job["error"] is None or job["error"] == pytest.approx(
            job["measured_bytes"] / job["predicted_bytes"] - 1)
    assert jobs["cache-zero3-x2"]["plan"]["launch"]["world_size"] == 2
    assert jobs["distill-zero2-cache"]["plan"]["student_zero"]["stage"] == 2
    assert jobs["distill-zero2-cache"]["steps"] == 2


def test_placements_cache_the_same_bytes_and_zero3_holds_half(results):
    report = json.loads((results / "results.json").read_text())
    assert report["checks"]["caches_identical"] is True
    assert 0.5 <= report["checks"]["zero3_params_share"] <= 0.55
    text = (results / "report.md").read_text()
    assert "| cache-zero3-x2 | 2 |" in text and "## Beyond one machine, on paper" in text
    assert (results / "scale_bench.png").read_bytes()[:4] == b"\x89PNG"

"""Faults in CI: a few seeded faults against real 2-process jobs, each checked as the
harness checks it (`python -m tools.faults.harness` runs many; docs/reliability.md)."""

from __future__ import annotations

import random
import resource

import pytest
import torch

from kdscale.cache import write_shard
from kdscale.cache.format import CacheError
from kdscale.cache.sidecar import finished_shards
from kdscale.distributed import TIMEOUT_VARIABLE, collective_timeout
from kdscale.errors import KdscaleError
from tools.faults.scenarios import draw, prepare, run_fault

TIMEOUT_S = 5  # the jobs' collective timeout: how long a hung rank may stall the others
SEED = 0


@pytest.fixture(scope="module")
def cache_job(tmp_path_factory):
    return prepare("cache", tmp_path_factory.mktemp("faults"), TIMEOUT_S)


def test_a_hung_rank_fails_the_cache_job_clearly_and_the_rerun_matches(cache_job):
    outcome = run_fault(cache_job, draw(cache_job, random.Random(SEED), "hung_rank"), "hung")
    assert outcome["injected"], outcome
    # The other rank gives up within the timeout with a message that says why, unless the
    # stopped rank had nothing left to wait for.
    assert outcome["message"] or outcome["finished_first"], outcome
    assert outcome["seconds_to_end"] < TIMEOUT_S + 60, outcome
    assert outcome["survived"], outcome  # the cache of an uninterrupted run, byte for byte
    assert (outcome["lost"], outcome["duplicates"], outcome["corrupt"]) == (0, 0, 0), outcome


def test_sigterm_checkpoints_and_the_rerun_trains_the_same_student(cache_job):
    distill_job = prepare("distill", cache_job.root, TIMEOUT_S)
    outcome = run_fault(distill_job, draw(distill_job, random.Random(SEED), "sigterm"), "term")
    assert outcome["injected"], outcome
    if outcome["message"]:  # stopped inside the loop: it saved where it stood, and resumed
        assert outcome["resumed_from"] == outcome["kept"] > 0, outcome
    assert outcome["survived"], outcome  # same losses, same weights, no checkpoint misread


def test_a_full_disk_fails_a_shard_write_clearly_and_leaves_nothing_trusted(tmp_path):
    shard = {"example_ids": torch.arange(16), "logits": torch.randn(16, 2),
             "dtype": "float16", "num_outputs": 2, "plan_id": "plan"}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # a real limit: writes get EFBIG
    try:
        with pytest.raises(CacheError, match="could not write shard 3 .*File too large"):
            write_shard(tmp_path, 3, **shard)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []  # no shard, no sidecar, no temporary file
    write_shard(tmp_path, 3, **shard)  # with room, the same call writes it
    assert list(finished_shards(tmp_path, "plan")) == [3]


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_VARIABLE, "2.5")
    assert collective_timeout().total_seconds() == 2.5
    for wrong in ("0", "-1", "soon"):
        monkeypatch.setenv(TIMEOUT_VARIABLE, wrong)
        with pytest.raises(KdscaleError, match=f"{TIMEOUT_VARIABLE}: expected a number"):
            collective_timeout()
    monkeypatch.delenv(TIMEOUT_VARIABLE)
    assert collective_timeout().total_seconds() == 1800

"""Faults in CI: one seeded fault of each kind against real 2-process jobs, checked as the
harness checks it. The seed is the date unless KDSCALE_FAULT_SEED is set, so the faults
rotate from day to day (tools/faults/sample.py); each failure message carries the command
that replays it (`python -m tools.faults.harness --sample --seed N --only KIND`)."""

from __future__ import annotations

import resource

import pytest
import torch

from kdscale.cache import write_shard
from kdscale.cache.format import CacheError
from kdscale.cache.sidecar import finished_shards
from kdscale.distributed import TIMEOUT_VARIABLE, collective_timeout
from kdscale.errors import KdscaleError
from tools.faults.harness import prepare_sample, run_pick
from tools.faults.inject import KINDS
from tools.faults.sample import fault_seed, replay_command, sample

pytestmark = pytest.mark.slow  # real launches: scheduled first (tests/conftest.py)

TIMEOUT_S = 5  # the jobs' collective timeout: how long a hung rank may stall the others
SEED = fault_seed()
PICKS = {pick.kind: pick for pick in sample(SEED)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The experiment, the uninterrupted cache and student, shared by the five faults."""
    jobs = {pick.job for pick in PICKS.values()}
    return prepare_sample(tmp_path_factory.mktemp("faults"), TIMEOUT_S, jobs)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sampled_fault_is_survived(jobs, kind):
    pick = PICKS[kind]
    outcome = run_pick(jobs[pick.job], pick, SEED)
    said = (f"seed {SEED}: {kind} on the {pick.job} job; replay: "
            f"{replay_command(SEED, kind, TIMEOUT_S)}\n{outcome}")
    print(said)
    assert outcome["injected"], said
    assert outcome["survived"], said  # the uninterrupted cache or student, byte for byte
    assert (outcome["lost"], outcome["duplicates"], outcome["corrupt"]) == (0, 0, 0), said
    if pick.early:  # in start-up: nothing was written, nothing is trusted
        assert (outcome["files_at_fault"], outcome["kept"]) == (0, 0), said
    if kind == "hung_rank":  # the other rank names the hung one, unless it had finished
        assert outcome["message"] or outcome["finished_first"], said
    if kind == "sigterm" and pick.job == "distill" and outcome["message"]:
        # stopped inside the loop: it saved where it stood, and the rerun resumed there
        assert outcome["resumed_from"] == outcome["kept"] > 0, said


def test_every_sample_has_each_kind_an_early_kill_and_both_jobs():
    for seed in (0, 1, SEED):
        picks = sample(seed)
        assert [p.kind for p in picks] == list(KINDS)
        assert sum(p.early for p in picks) == 1
        assert next(p for p in picks if p.early).kind in ("kill_rank", "kill_job")
        assert sorted(p.job for p in picks) == ["cache"] * 3 + ["distill"] * 2


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

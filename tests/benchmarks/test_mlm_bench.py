"""The masked-LM benchmark end to end at a toy size: real SST-2 sentences, the tiny BERT of
the SST-2 benchmark's test standing in for MiniLM, two seeds, every kind. Checks what the
report rests on (kinds, seeds, bytes, audits, goals); no accuracy or timing is asserted."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.mlm.tables import fmt
from benchmarks.sst2.report import spread
from tests.support.sst2 import REPO, tiny_pretrained_bert

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI
TRAIN_ROWS, DEV_ROWS, SEEDS = 64, 32, [1, 2]
SETTINGS = yaml.safe_load((REPO / "benchmarks" / "mlm" / "bench.yaml").read_text())
BUDGET_KINDS = [n for n, spec in SETTINGS["kinds"].items() if spec.get("k") == "budget"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("mlm_bench")
    teacher = tiny_pretrained_bert(root / "pretrained")
    command = [sys.executable, "-m", "benchmarks.mlm", "--out", str(root / "out"), "--work",
               str(root / "work"), "--teacher_model", str(teacher), "--max_train_examples",
               str(TRAIN_ROWS), "--teacher_train_examples", str(TRAIN_ROWS),
               "--max_eval_examples", str(DEV_ROWS), "--seeds", *map(str, SEEDS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)  # a safety net on a busy machine, not a limit
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "out" / "results.json").read_text()), root / "work"


@pytest.fixture(scope="module")
def results(run) -> dict:
    return run[0]


def test_every_kind_and_seed_is_trained_alike_and_scored_on_the_same_tokens(results):
    runs = [r for kind in results["students"].values() for r in kind]
    assert list(results["students"]) == list(SETTINGS["kinds"])
    assert all([r["seed"] for r in kind] == SEEDS for kind in results["students"].values())
    assert len({r["steps"] for r in runs}) == 1 and runs[0]["steps"] > 0  # same steps
    models = [results["teacher"], *runs]
    assert len({m["masked_tokens"] for m in models}) == 1 and models[0]["masked_tokens"] > 0
    assert all(m["examples"] == DEV_ROWS and 0 <= m["accuracy"] <= 1 for m in models)


def test_summaries_state_n_and_the_seeds_spread(results, run):
    for kind, runs in results["students"].items():
        summary = results["summary"][kind]["accuracy"]
        accuracies = [r["accuracy"] for r in runs]
        assert summary["n"] == len(SEEDS)
        assert math.isclose(summary["mean"], statistics.fmean(accuracies))
        assert math.isclose(summary["std"], statistics.stdev(accuracies), abs_tol=1e-12)
    report = (run[1].parent / "out" / "report.md").read_text()
    assert report.count(f"(n = {len(SEEDS)}") == 2 * len(SETTINGS["kinds"])  # accuracy, ppl


def test_one_seed_is_reported_as_n_1_without_a_spread():
    one = fmt(spread([0.3]), 4)
    assert one == "0.3000 (n = 1)" and "±" not in one


def shard_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.glob("shard-*.safetensors"))


def test_budget_kinds_take_equal_bytes_per_position_as_their_shards_show(results, run):
    budget, slot = SETTINGS["bytes_per_position"], results["layout"]["slot"]
    caches = {kind: results["caches"][kind] for kind in BUDGET_KINDS}
    own = [c["position_bytes"] for c in caches.values()]
    assert all(budget - slot < b <= budget for b in own)  # within one slot of the budget
    for kind, cache in caches.items():
        assert cache["bytes"] == shard_bytes(run[1] / "caches" / kind)
        assert math.isclose(cache["bytes_per_position"], cache["bytes"] / cache["rows"])
    # What a position costs beyond its own bytes (each sentence's fields, the file headers)
    # is the same for every kind: the modelled differences are the shards' differences.
    extra = [c["bytes_per_position"] - c["position_bytes"] for c in caches.values()]
    assert max(extra) - min(extra) < 1.0 and min(extra) > 0
    assert len({(c["rows"], c["examples"]) for c in results["caches"].values()}) == 1


def test_the_dense_reference_keeps_every_logit(results, run):
    dense = results["caches"]["dense"]
    vocabulary = json.loads((run[1] / "teacher" / "config.json").read_text())["vocab_size"]
    assert dense["k"] == vocabulary and dense["audit"] is None  # nothing left out to audit
    assert dense["bytes"] == shard_bytes(run[1] / "caches" / "dense")


def test_each_cached_kind_has_its_audit(results):
    for kind in BUDGET_KINDS:
        cache = results["caches"][kind]
        audit = cache["audit"]
        assert audit["k"] == cache["k"] and audit["rows"] > 0
        assert 0 < audit["mass_covered"] <= 1
        assert audit["temperature"] == SETTINGS["kd"]["loss"]["temperature"]
        for figures in (audit["topk"], audit["topk_tail"], audit["sampled"]):
            assert 0 <= figures["loss_error"] < math.inf and 0 <= figures["grad_error"] < math.inf


def test_goals_follow_from_the_recorded_figures(results):
    goals = {g["name"]: g for g in results["goals"]}
    summary = results["summary"]
    best = max(BUDGET_KINDS, key=lambda kind: summary[kind]["accuracy"]["mean"])
    by_seed = {kind: [r["accuracy"] for r in results["students"][kind]]
               for kind in (best, "labels", "dense")}
    margin = statistics.fmean(by_seed[best]) - statistics.fmean(by_seed["labels"])
    sd = math.hypot(statistics.stdev(by_seed[best]), statistics.stdev(by_seed["labels"]))
    assert goals["labels"]["met"] == (margin > SETTINGS["goals"]["labels_margin_sds"] * sd)
    gap = 100 * (statistics.fmean(by_seed["dense"]) - statistics.fmean(by_seed[best]))
    assert goals["dense"]["met"] == (gap <= SETTINGS["goals"]["dense_points"])
    caches = results["caches"]
    sampled = caches["sampled"]["audit"]["sampled"]["grad_error"]
    assert goals["gradient"]["met"] == (sampled < caches["topk"]["audit"]["topk"]["grad_error"])


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
    assert results["device"] and results["times"]["total_s"] > 0

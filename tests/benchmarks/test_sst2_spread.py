"""benchmarks/sst2/spread.py on the committed SST-2 results: a run set beside itself moves
nothing, a model moved by some rows is found with its size, and runs scored on other rows
are refused rather than compared."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks.sst2.spread import compare, markdown

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "sst2" / "results" / "results.json"


@pytest.fixture
def run() -> dict:
    return json.loads(RESULTS.read_text())


def test_a_run_beside_itself_is_identical_model_by_model(run):
    table = compare(run, run)
    students = {f"kdscale {name} {kind}" for name, kinds in run["kdscale"]["students"].items()
                for kind in kinds}
    assert students | {"kdscale teacher", "baseline teacher"} <= {r["model"] for r in table}
    assert all(r["identical"] and r["dev_rows_max"] == r["test_rows_max"] == 0 for r in table)


def test_a_model_moved_by_three_dev_rows_is_the_one_reported(run):
    moved = copy.deepcopy(run)
    runs = moved["kdscale"]["students"]["3-layer"]["kd"]
    runs[1]["accuracy"] += 3 / run["dev"]["examples"]
    table = {r["model"]: r for r in compare(run, moved)}
    changed = table.pop("kdscale 3-layer kd")
    assert not changed["identical"]
    assert (changed["dev_rows_max"], changed["dev_rows_mean"]) == (3, pytest.approx(3 / len(runs)))
    assert changed["test_rows_max"] == 0
    assert all(r["identical"] for r in table.values())
    assert "| kdscale 3-layer kd | 3 | no | 3 / 1.0 | 0 / 0.0 |" in markdown(run, moved,
                                                                        compare(run, moved))


def test_runs_scored_on_other_test_rows_are_refused(run):
    other = copy.deepcopy(run)
    other["test"]["example_ids_sha256"] = "0" * 64
    with pytest.raises(SystemExit, match="different dev or test rows"):
        compare(run, other)

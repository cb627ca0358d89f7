"""The SST-2 benchmark end to end at a toy size: real SST-2 rows from ../shared/data, a tiny
BERT with a WordPiece vocabulary learned from them standing in for MiniLM (whose weights
come from a package CI does not install), both sides, the report. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sst2 import report as sst2_report
from benchmarks.sst2 import run as sst2_run
from tests.support.sst2 import REPO, tiny_pretrained_bert

TRAIN_ROWS, DEV_ROWS = 128, 48

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI




def bench_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["--out", str(root / out), "--work", str(root / "work"), "--teacher_model",
            str(root / "pretrained"), "--max_train_examples", str(TRAIN_ROWS),
            "--max_eval_examples", str(DEV_ROWS), "--seeds", "1", "2", "--latency_batches", "2",
            *extra]


def run_bench(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sst2", *args], cwd=REPO, env=env,
                            capture_output=True, text=True,
                            timeout=900)  # a safety net on a busy machine, not a limit
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """The benchmark in two parts, as a long run can be made: the kdscale side, then the
    baseline against its results. `results` holds both sides, as one run's would."""
    root = tmp_path_factory.mktemp("sst2")
    tiny_pretrained_bert(root / "pretrained")
    run_bench(bench_args(root, "kdscale_side", "--skip_baseline"))
    run_bench(bench_args(root, "out", "--kdscale_from", str(root / "kdscale_side" /
                                                               "results.json")))
    return root / "out"


def all_models(report: dict):
    for side in ("kdscale", "baseline"):
        yield f"{side} teacher", report[side]["teacher"]
        for name, kinds in report[side]["students"].items():
            for kind, runs in kinds.items():
                for run in runs:
                    yield f"{side} {name} {kind} seed {run['seed']}", run


def test_every_model_is_scored_on_the_same_dev_rows(results):
    report = json.loads((results / "results.json").read_text())
    assert report["dev"]["examples"] == DEV_ROWS
    models = dict(all_models(report))
    assert len(models) == 2 + 2 * 2 * 2 + 2 * 2  # teachers; kdscale kd+hard; baseline kd
    for name, metrics in models.items():
        assert metrics["examples"] == DEV_ROWS, name
        right = metrics["accuracy"] * DEV_ROWS  # a count of the dev rows it got right
        assert right == pytest.approx(round(right)), name
        assert metrics["latency_ms"] > 0 and metrics["train_s"] > 0, name
    assert report["device"] and report["train_rows"] == TRAIN_ROWS
    # The KD students' cache holds the labelled rows and their augmented copies.
    copies = report["settings"]["experiment"]["data"]["augment"]["copies"]
    assert copies >= 1 and report["transfer_rows"] == TRAIN_ROWS * (1 + copies)


def test_the_results_name_data_files_relative_to_the_repository(results):
    """Results are committed: they record where the data lies beside the repository, not
    on the machine that ran them."""
    data = json.loads((results / "results.json").read_text())["settings"]["experiment"]["data"]
    for key, name in (("train_file", "train.tsv"), ("eval_file", "dev.tsv")):
        assert data[key] == os.path.join("..", "shared", "data", "sst2", name)


def test_students_have_their_sizes_on_both_sides(results):
    report = json.loads((results / "results.json").read_text())
    for name, layers in (("3-layer", 3), ("2-layer", 2)):
        ours = report["kdscale"]["students"][name]
        theirs = report["baseline"]["students"][name]["kd"]
        assert [r["seed"] for r in ours["kd"]] == [r["seed"] for r in theirs] == [1, 2]
        assert theirs[0]["teacher_layers"] == list(range(layers))  # the classic recipe's first K
        for run in ours["kd"] + ours["hard"] + theirs:
            assert run["layers"] == len(run["teacher_layers"]) == layers
            assert run["params"] == ours["kd"][0]["params"] < report["kdscale"]["teacher"]["params"]


def test_summary_follows_from_the_runs(results):
    report = json.loads((results / "results.json").read_text())
    side, summary = report["kdscale"], report["summary"]["kdscale"]
    kd3 = summary["students"]["3-layer"]["kd"]
    accuracies = [r["accuracy"] for r in side["students"]["3-layer"]["kd"]]
    assert kd3["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert kd3["retention"]["mean"] == pytest.approx(
        kd3["accuracy"]["mean"] / side["teacher"]["accuracy"])
    assert summary["pipeline_s"] == pytest.approx(
        side["teacher"]["train_s"] + side["cache_s"]
        + sum(s["kd"]["train_s"] for s in summary["students"].values()))
    assert side["cache_bytes"] >= report["transfer_rows"] * 2 * 2  # two fp16 logits a row
    # Each student's two goals are met exactly when its numbers say so.
    goals = {g["goal"]: g["met"] for g in report["summary"]["goals"]}
    for name, spec in report["settings"]["students"].items():
        student = summary["students"][name]
        retention = student["kd"]["retention"]["mean"]
        assert goals[f"{name} KD student keeps >= {spec['retention_goal']:.0%} of the "
                     f"teacher"] == (retention >= spec["retention_goal"])
        assert goals[f"{name} KD student beats the hard-label student"] == (
            student["kd"]["accuracy"]["mean"] > student["hard"]["accuracy"]["mean"])


def test_report_and_plot_are_written(results):
    text = (results / "report.md").read_text()
    for row in ("kdscale teacher", "kdscale 3-layer KD", "kdscale 2-layer hard labels",
                "baseline 2-layer KD", "**pipeline**"):
        assert row in text
    assert (results / "sst2_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_kdscale_only_full_size_report_claims_no_baseline_or_time_goal(results):
    """`--full --skip_baseline`: the goals left are the students' own; the 45-minute goal
    belongs to the 2-core subset."""
    raw = json.loads((results / "results.json").read_text())
    settings = {**raw["settings"], "max_train_examples": None}
    rebuilt = sst2_report.build(settings, raw["dev"], raw["kdscale"], None, total_s=7200.0)
    goals = [g["goal"] for g in rebuilt["summary"]["goals"]]
    assert len(goals) == 2 * len(settings["students"])
    assert not any("baseline" in g or "minutes" in g for g in goals)
    text = sst2_report.markdown(rebuilt)
    assert "(no baseline in this run)" in text and "baseline teacher" not in text


def test_the_second_part_adds_the_baseline_to_the_first_parts_results(results):
    first = json.loads((results.parent / "kdscale_side" / "results.json").read_text())
    both = json.loads((results / "results.json").read_text())
    assert first["baseline"] is None and both["baseline"]["teacher"]["accuracy"] > 0
    assert both["kdscale"] == first["kdscale"]
    assert both["total_s"] > first["total_s"]  # the first part's time, then the second's


def test_a_second_part_with_other_settings_is_refused(results):
    root = results.parent
    earlier = str(root / "kdscale_side" / "results.json")
    args = bench_args(root, "refused", "--kdscale_from", earlier)
    with pytest.raises(SystemExit, match=r"settings differ from this one's in \['seeds'\]"):
        sst2_run.main([*args, "--seeds", "1"])
    assert not (root / "refused").exists()

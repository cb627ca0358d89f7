"""The SST-2 benchmark end to end at a toy size: real SST-2 rows from ../shared/data, a tiny
BERT with a WordPiece vocabulary learned from them standing in for MiniLM (whose weights
come from a package CI does not install), both sides, the report. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from benchmarks.sst2 import report as sst2_report
from benchmarks.sst2 import run as sst2_run
from tests.support.sst2 import (
    TRAIN_ROWS,
    UNLABELLED_ROWS,
    bench_args,
    check_scored_alike,
    load,
    run_bench,
    tiny_pretrained_bert,
)

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sst2")
    tiny_pretrained_bert(root / "pretrained")
    return root


@pytest.fixture(scope="module")
def results(root) -> Path:
    """The benchmark in two parts, as a long run can be made: the kdscale side, then the
    baseline against its results. `results` holds both sides, as one run's would. The
    controls and the ablation are left out here (test_sst2_controls.py runs them)."""
    # fp32 here, bench.yaml's bf16 in test_sst2_controls.py: the two precisions the goals ask for.
    skip = ("--skip_controls", "--skip_ablation", "--skip_levers", "--precision", "fp32")
    run_bench(bench_args(root, "kdscale_side", *skip, "--skip_baseline"))
    run_bench(bench_args(root, "out", *skip, "--kdscale_from",
                         str(root / "kdscale_side" / "results.json")))
    return root / "out"


def test_every_model_is_scored_on_the_same_dev_and_test_rows(results):
    report = load(results)
    check_scored_alike(report, 2 + 2 * 2 * 2 + 2 * 2)  # teachers; kdscale kd+hard; baseline kd
    assert report["device"] and report["train_rows"] == TRAIN_ROWS
    # The KD students' cache holds the labelled rows, their augmented copies and the
    # unlabelled rows.
    settings = report["settings"]
    copies = settings["experiment"]["data"]["augment"]["copies"]
    assert settings["unlabelled_rows"] == UNLABELLED_ROWS
    assert copies >= 1 and report["transfer_rows"] == TRAIN_ROWS * (1 + copies) + UNLABELLED_ROWS


def test_the_precision_given_is_the_one_every_stage_trained_in(results):
    settings = load(results)["settings"]
    assert settings["precision"] == "fp32"
    experiment = settings["experiment"]
    assert experiment["teacher"]["precision"] == "fp32"
    assert {experiment[stage]["mixed_precision"] for stage in ("finetune", "distill")} == {"no"}
    assert {settings["baseline"][stage]["precision"] for stage in ("finetune", "distill")} == {
        "fp32"}


def test_the_results_name_data_files_relative_to_the_repository(results):
    """Results are committed: they record where the data lies beside the repository, not
    on the machine that ran them (the split's files are in the work folder, unnamed)."""
    data = load(results)["settings"]["experiment"]["data"]
    for key, name in (("train_file", "train.tsv"), ("eval_file", "dev.tsv")):
        assert data[key] == os.path.join("..", "shared", "data", "sst2", name)
    assert str(results.parent / "work") not in (results / "results.json").read_text()


def test_students_have_their_sizes_on_both_sides(results):
    report = load(results)
    for name, layers in (("3-layer", 3), ("2-layer", 2)):
        ours = report["kdscale"]["students"][name]
        theirs = report["baseline"]["students"][name]["kd"]
        assert set(ours) == {"kd", "hard"} and set(report["baseline"]["students"][name]) == {"kd"}
        assert [r["seed"] for r in ours["kd"]] == [r["seed"] for r in theirs] == [1, 2]
        assert theirs[0]["teacher_layers"] == list(range(layers))  # the classic recipe's first K
        for run in ours["kd"] + ours["hard"] + theirs:
            assert run["layers"] == len(run["teacher_layers"]) == layers
            assert run["params"] == ours["kd"][0]["params"] < report["kdscale"]["teacher"]["params"]


def test_the_hard_label_control_takes_its_kd_students_steps(results):
    report = load(results)
    batch = report["settings"]["experiment"]["distill"]["batch_size"]
    for name, kinds in report["kdscale"]["students"].items():
        for kd, hard in zip(kinds["kd"], kinds["hard"], strict=True):
            assert kd["train_rows"] == report["transfer_rows"]  # copies included
            assert kd["steps"] == math.ceil(kd["epochs"] * math.ceil(kd["train_rows"] / batch))
            assert hard["train_rows"] == TRAIN_ROWS and hard["steps"] == kd["steps"], name
            assert hard["epochs"] * math.ceil(TRAIN_ROWS / batch) == pytest.approx(hard["steps"])


def test_summary_follows_from_the_runs(results):
    report = load(results)
    side, summary = report["kdscale"], report["summary"]["kdscale"]
    kd3 = summary["students"]["3-layer"]["kd"]
    runs = side["students"]["3-layer"]["kd"]
    assert kd3["accuracy"]["mean"] == pytest.approx(sum(r["accuracy"] for r in runs) / 2)
    assert kd3["test_accuracy"]["mean"] == pytest.approx(
        sum(r["test"]["accuracy"] for r in runs) / 2)
    assert kd3["retention"]["mean"] == pytest.approx(
        kd3["accuracy"]["mean"] / side["teacher"]["accuracy"])
    assert kd3["test_retention"]["mean"] == pytest.approx(
        kd3["test_accuracy"]["mean"] / side["teacher"]["test"]["accuracy"])
    assert summary["pipeline_s"] == pytest.approx(
        side["teacher"]["train_s"] + side["cache_s"]
        + sum(s["kd"]["train_s"] for s in summary["students"].values()))
    assert side["cache_bytes"] >= report["transfer_rows"] * 2 * 2  # two fp16 logits a row


def test_each_goal_is_met_exactly_when_its_numbers_say_so_on_dev_and_test(results):
    report = load(results)
    summary = report["summary"]["kdscale"]
    goals = {(g["goal"], g["split"]): g["met"] for g in report["summary"]["goals"]}
    sds = report["settings"]["goals"]["kd_margin_sds"]
    for (accuracy, retention), split in ((("accuracy", "retention"), "dev"),
                                         (("test_accuracy", "test_retention"), "test")):
        for name, spec in report["settings"]["students"].items():
            kd, hard = summary["students"][name]["kd"], summary["students"][name]["hard"]
            kept = kd[retention]["mean"]
            assert goals[(f"{name} KD student keeps >= {spec['retention_goal']:.1%} of the "
                          f"teacher", split)] == (kept >= spec["retention_goal"])
            lead = kd[accuracy]["mean"] - hard[accuracy]["mean"]
            assert goals[(f"{name} KD student beats its hard-label control (step-matched)",
                          split)] == (lead > 0)
            noise = sds * math.hypot(kd[accuracy]["std"], hard[accuracy]["std"])
            assert goals[(f"{name} KD student ahead of its hard-label control by more than "
                          f"{sds:g} standard deviations of the seeds", split)] == (lead > noise)
    times = report["times"]
    assert times["main_s"] == pytest.approx(times["total_s"])  # no controls, no ablation here
    assert sum(1 for goal, split in goals if "minutes" in goal and split == "-") == 1


def test_report_has_dev_and_test_columns_and_names_its_comparison(results):
    text = (results / "report.md").read_text()
    for row in ("kdscale teacher", "kdscale 3-layer KD", "baseline 2-layer KD",
                "kdscale 2-layer hard labels, step-matched", "**pipeline**",
                "| dev accuracy (mean ± std, min-max) | test accuracy |",
                "retention dev / test", "| goal | split |",
                "of the baseline as users run it today", "No ablation in this run"):
        assert row in text, row
    assert (results / "sst2_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_kdscale_only_full_size_report_claims_no_baseline_or_time_goal(results):
    """`--full --skip_baseline`: the goals left are the students' own; the 45-minute goal
    belongs to the 2-core subset."""
    raw = load(results)
    settings = {**raw["settings"], "max_train_examples": None}
    rebuilt = sst2_report.build(settings, {"dev": raw["dev"], "test": raw["test"]},
                                raw["kdscale"], None, None, total_s=7200.0)
    goals = [g["goal"] for g in rebuilt["summary"]["goals"]]
    assert len(goals) == 3 * 2 * len(settings["students"])  # 3 goals, dev and test
    assert not any("baseline" in g or "minutes" in g for g in goals)
    text = sst2_report.markdown(rebuilt)
    assert "(no baseline in this run)" in text and "baseline teacher" not in text


def test_the_second_part_adds_the_baseline_to_the_first_parts_results(results):
    first = load(results.parent / "kdscale_side")
    both = load(results)
    assert first["baseline"] is None and both["baseline"]["teacher"]["accuracy"] > 0
    assert both["kdscale"] == first["kdscale"] and both["test"] == first["test"]
    assert both["total_s"] > first["total_s"]  # the first part's time, then the second's


def test_a_second_part_with_other_settings_is_refused(results):
    root = results.parent
    earlier = str(root / "kdscale_side" / "results.json")
    args = bench_args(root, "refused", "--skip_controls", "--skip_ablation", "--skip_levers",
                      "--precision", "fp32", "--kdscale_from", earlier)
    with pytest.raises(SystemExit, match=r"settings differ from this one's in \['seeds'\]"):
        sst2_run.main([*args, "--seeds", "1"])
    assert not (root / "refused").exists()


def test_an_earlier_run_in_the_results_folder_moves_to_history(results, tmp_path):
    """A rerun into the same folder keeps the earlier run in the record."""
    out = tmp_path / "results"
    out.mkdir()
    earlier = load(results)
    (out / "results.json").write_text(json.dumps(earlier))
    (out / "report.md").write_text("earlier report")
    sst2_report.write({**earlier, "total_s": 1.0}, out)
    kept = out / "history" / (earlier["commit"] or "uncommitted")[:7]
    assert json.loads((kept / "results.json").read_text()) == earlier
    assert (kept / "report.md").read_text() == "earlier report"
    assert load(out)["total_s"] == 1.0

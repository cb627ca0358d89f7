"""The SST-2 benchmark's controls, speed ablation and held-out test split, in one toy run with
one seed (the main comparison's tests, with two seeds, are in test_sst2_bench.py)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from benchmarks.sst2.run import SETTINGS
from benchmarks.sst2.split import ids_sha256, read_tsv
from kdscale.config import config_from_dict
from kdscale.data import tokenize_labelled
from kdscale.data.augment import NO_LABEL
from kdscale.models import label_names, load_model, load_tokenizer
from tests.support.sst2 import (
    DEV_ROWS,
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
    root = tmp_path_factory.mktemp("sst2_controls")
    tiny_pretrained_bert(root / "pretrained")
    settings = yaml.safe_load(SETTINGS.read_text())
    settings["levers"] = LEVERS
    (root / "bench.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    run_bench(bench_args(root, "out", "--settings", str(root / "bench.yaml"), seeds=("1",)))
    return root


# Two levers of the toy run: rows of the transfer set changed (its own cache), and a
# teacher of its own (its own fine-tune, then cache).
LEVERS = {"unlabelled rows alone": {"unlabelled_rows": 32,
                                    "kd": {"data": {"augment": {"copies": 0}}}},
          "a teacher of 2 epochs": {"teacher": {"finetune": {"epochs": 2}}}}


@pytest.fixture(scope="module")
def report(root) -> dict:
    return load(root / "out")


def test_every_model_is_scored_on_the_same_dev_and_test_rows(report):
    # kdscale: teacher + 2 sizes x (KD, hard, KD without copies); baseline: teacher, 2 KD
    # students and the 2-layer one of kdscale's layers; ablation: 4 steps x (teacher + 2).
    check_scored_alike(report, 7 + 4 + 4 * 3)


def test_step_matched_controls_take_their_kd_students_steps(root, report):
    side = report["kdscale"]
    batch = report["settings"]["experiment"]["distill"]["batch_size"]
    for name, kinds in side["students"].items():
        kd, hard, plain = kinds["kd"][0], kinds["hard"][0], kinds["kd_no_copies"][0]
        copies = report["settings"]["experiment"]["data"]["augment"]["copies"]
        assert kd["train_rows"] == report["transfer_rows"] == TRAIN_ROWS * (1 + copies) \
            + UNLABELLED_ROWS
        assert kd["steps"] == math.ceil(kd["epochs"] * math.ceil(kd["train_rows"] / batch))
        for control in (hard, plain):
            assert control["train_rows"] == TRAIN_ROWS and control["steps"] == kd["steps"], name
    # KD without copies reads its own cache: the labelled rows alone, kept out of the pipeline.
    manifest = json.loads((root / "work/kdscale/cache_no_copies/manifest.json").read_text())
    assert manifest["num_examples"] == TRAIN_ROWS and side["cache_no_copies_s"] > 0
    summary = report["summary"]["kdscale"]
    assert summary["pipeline_s"] == pytest.approx(
        side["teacher"]["train_s"] + side["cache_s"]
        + sum(kinds["kd"]["train_s"] for kinds in summary["students"].values()))


def test_the_baseline_control_has_kdscales_layers_where_they_differ(report):
    students = report["baseline"]["students"]
    assert "kd_kdscale_layers" not in students["3-layer"]  # first:3 is the first 3 already
    control, first_k = students["2-layer"]["kd_kdscale_layers"][0], students["2-layer"]["kd"][0]
    ours = report["settings"]["students"]["2-layer"]["kdscale"]  # bench.yaml's, not [0, 1]
    assert control["teacher_layers"] == ours and first_k["teacher_layers"] == [0, 1]
    assert control["steps"] == first_k["steps"] and control["layers"] == 2


def split_rows(root: Path) -> tuple[list[list[str]], list[list[str]]]:
    return read_tsv(root / "work/split/train.tsv")[1], read_tsv(root / "work/split/test.tsv")[1]


def test_held_out_rows_are_in_no_training_set_of_either_side(root, report):
    train, test = split_rows(root)
    held = {int(row[2]) for row in test}
    labelled = [int(row[2]) for row in train[:TRAIN_ROWS]]
    assert not held & set(labelled) and not {r[1] for r in test} & {r[1] for r in train}
    # What each side read, by the rows of train.tsv: the split's first rows, nothing held out.
    assert report["kdscale"]["train_rows_sha256"] == ids_sha256(labelled)
    assert report["baseline"]["train_rows_sha256"] == ids_sha256(labelled)
    assert report["test"]["example_ids_sha256"] == ids_sha256(
        [int(row[2]) for row in test[:DEV_ROWS]])


def test_the_unlabelled_rows_follow_the_labelled_ones_without_their_labels(root):
    train, test = split_rows(root)
    header, rows = read_tsv(root / "work/split/unlabelled.tsv")
    assert header == ["sentence", "source_row"]  # no label column
    assert rows == [[row[1], row[2]] for row in train[TRAIN_ROWS:TRAIN_ROWS + UNLABELLED_ROWS]]
    assert not {r[1] for r in rows} & {r[2] for r in test}


def test_the_teacher_labelled_the_split_rows_and_copies_of_them_alone(root, report):
    """The caches every KD student read (distill checks their fingerprint) match the
    transfer sets rebuilt from the split's training file: its first rows, their copies and
    the unlabelled rows after them."""
    work = root / "work/kdscale"
    raw = copy.deepcopy(report["settings"]["experiment"])
    raw["data"].update(train_file=str(root / "work/split/train.tsv"),
                       eval_file=str(root / "work/split/test.tsv"),
                       unlabelled_file=str(root / "work/split/unlabelled.tsv"))
    tokenizer = load_tokenizer(work / "teacher")
    labels = label_names(load_model(work / "teacher", "teacher"))
    transfer = tokenize_labelled(config_from_dict(raw).data, tokenizer, "train", labels,
                                 augment=True)
    manifest = json.loads((work / "cache/manifest.json").read_text())
    assert transfer.fingerprint == manifest["data_fingerprint"]
    train, test = split_rows(root)
    held = {int(row[2]) for row in test}
    copied = TRAIN_ROWS * (1 + raw["data"]["augment"]["copies"])
    ids = transfer.dataset["example_id"]
    assert ids == list(range(copied + UNLABELLED_ROWS))
    sources = {int(train[i % TRAIN_ROWS][2]) for i in ids[:copied]}
    assert len(sources) == TRAIN_ROWS and not sources & held  # copies come from these rows
    assert set(transfer.dataset["labels"][TRAIN_ROWS:]) == {NO_LABEL}
    raw["data"]["augment"]["copies"], raw["data"]["unlabelled_file"] = 0, None
    labelled = tokenize_labelled(config_from_dict(raw).data, tokenizer, "train", labels)
    plain = json.loads((work / "cache_no_copies/manifest.json").read_text())
    assert labelled.fingerprint == plain["data_fingerprint"]


def test_the_ablation_changes_one_choice_at_a_time_and_keeps_the_recipe(report):
    steps, settings = report["ablation"]["steps"], report["settings"]
    assert [s["step"] for s in steps] == [s["step"] for s in settings["ablation"]]
    declared = {s["step"]: {k: v for k, v in s.items() if k != "step"}
                for s in settings["ablation"]}
    for before, step in itertools.pairwise(steps):  # its own options over the steps before
        assert step["options"] == {**before["options"], **declared[step["step"]]}
        assert step["options"] != before["options"]
    assert steps[-1]["options"]["teacher"] == "cached" and steps[-1]["cache_s"] > 0
    assert all(step["cache_s"] == 0 for step in steps[:-1])
    # Step 0 is the baseline side's own run; every step trains the same recipe.
    baseline = report["baseline"]
    assert steps[0]["teacher"] == baseline["teacher"]
    for name, run in steps[0]["students"].items():
        assert run == baseline["students"][name]["kd"][0]
    for step in steps:
        for name, run in step["students"].items():
            first = steps[0]["students"][name]
            assert (run["steps"], run["teacher_layers"], run["train_rows"]) == (
                first["steps"], first["teacher_layers"], first["train_rows"]), step["step"]
    # Frozen embeddings and the cache change no option of the teacher's: it is shared.
    assert [s["teacher_shared"] for s in steps] == [False, False, True, True]
    assert steps[3]["teacher"] == steps[2]["teacher"] == steps[1]["teacher"]


def test_the_ablations_shares_add_up_to_the_whole_saving(report):
    raw, summary = report["ablation"]["steps"], report["summary"]["ablation"]
    pipelines = [s["teacher"]["train_s"] + s["cache_s"]
                 + sum(r["train_s"] for r in s["students"].values()) for s in raw]
    assert [s["pipeline_s"] for s in summary["steps"]] == pytest.approx(pipelines)
    assert summary["total_saving_s"] == pytest.approx(pipelines[0] - pipelines[-1])
    assert sum(s["share"] for s in summary["steps"][1:]) == pytest.approx(1.0)
    for before, step in zip(pipelines, summary["steps"][1:], strict=False):
        assert step["saving_s"] == pytest.approx(before - step["pipeline_s"])
    kdscale = report["summary"]["kdscale"]["pipeline_s"]
    assert summary["kdscale"]["of_today"] == pytest.approx(kdscale / pipelines[0])
    assert summary["kdscale"]["of_step_before_last"] == pytest.approx(kdscale / pipelines[-2])
    times = report["times"]
    assert times["ablation_s"] > sum(pipelines[1:]) - 2 * raw[1]["teacher"]["train_s"]
    assert times["main_s"] == pytest.approx(
        times["total_s"] - times["controls_s"] - times["ablation_s"] - times["levers_s"],
        abs=0.2)


def test_a_one_seed_report_says_so_and_shows_no_spread(root, report):
    text = (root / "out/report.md").read_text()
    assert "± 0.0000" not in text and "(one seed)" in text
    assert "## The speed figure taken apart" in text and "One seed (seed 1)" in text
    assert "Taken apart on the plain recipe" in text  # the headline names both comparisons
    margins = [g for g in report["summary"]["goals"] if "standard deviations" in g["goal"]]
    assert len(margins) == 4 and all(g["met"] is None for g in margins)
    assert "n/a (one seed)" in text


def test_each_lever_trains_every_size_from_its_own_cache_and_teacher(root, report):
    levers, summary = report["kdscale"]["levers"], report["summary"]["levers"]
    assert list(levers) == list(LEVERS) and report["times"]["levers_s"] > 0
    work, sizes = root / "work/kdscale/levers", list(report["settings"]["students"])
    alone = json.loads((work / "unlabelled-rows-alone/cache/manifest.json").read_text())
    assert alone["num_examples"] == TRAIN_ROWS + 32  # the labelled rows and its 32, no copies
    header, rows = read_tsv(work / "unlabelled-rows-alone/unlabelled.tsv")
    assert len(rows) == 32 and header == ["sentence", "source_row"]
    assert (work / "unlabelled-rows-alone/teacher").resolve() == (
        root / "work/kdscale/teacher").resolve()
    own = levers["a teacher of 2 epochs"]["teacher"]
    assert own["steps"] == 2 * report["kdscale"]["teacher"]["steps"]
    assert summary["a teacher of 2 epochs"]["teacher"]["own"]
    for name, lever in levers.items():
        assert list(lever["students"]) == sizes and lever["cache_s"] > 0
        for size in sizes:
            runs, recipe = lever["students"][size], report["kdscale"]["students"][size]["kd"]
            assert [r["seed"] for r in runs] == [r["seed"] for r in recipe]
            gain = summary[name]["gain"][size]["dev"]
            assert gain == pytest.approx(runs[0]["accuracy"] - recipe[0]["accuracy"])
    assert "## Each accuracy lever alone" in (root / "out/report.md").read_text()

"""Unlabelled text as transfer set (data.unlabelled_file): its rows follow the training rows
and their copies, carry no hard label, are cached once with the teacher's logits, and a
cache without them (or with other ones) is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertTokenizerFast

from kdscale.cache import CacheMismatchError
from kdscale.commands.distill import run_distill
from kdscale.config import ConfigError, config_from_dict
from kdscale.data.augment import NO_LABEL
from kdscale.data.sources import DataError
from kdscale.tasks import get_task
from tests.support.pipeline import kdscale, write_config

TRAIN_ROWS = ["a gripping film", "dull and slow", "bright moving story"]
UNLABELLED_ROWS = ["a slow story", "gripping and bright", "dull film", "moving"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = sorted({w for line in TRAIN_ROWS + UNLABELLED_ROWS for w in line.split()})
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def write_files(tmp_path, unlabelled_header="sentence\tlabel", unlabelled=UNLABELLED_ROWS):
    train, extra = tmp_path / "train.tsv", tmp_path / "unlabelled.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n"
                                                  for i, t in enumerate(TRAIN_ROWS)))
    # A label column in the unlabelled file is ignored: here every row says 1.
    width = unlabelled_header.count("\t")
    extra.write_text(unlabelled_header + "\n" + "".join(t + "\t1" * width + "\n"
                                                        for t in unlabelled))
    return train, extra


def transfer_set(tmp_path, tokenizer, **data):
    train, extra = write_files(tmp_path)
    config = config_from_dict({"data": {"train_file": str(train), "unlabelled_file": str(extra),
                                        **data}, "loss": {"alpha": 0.5}})
    return get_task("classification").transfer_set(config, tokenizer)


def test_unlabelled_rows_follow_the_rows_and_copies_without_a_label(tmp_path, tokenizer):
    data = transfer_set(tmp_path, tokenizer, augment={"copies": 1}).dataset.to_dict()
    n, m = len(TRAIN_ROWS), len(UNLABELLED_ROWS)
    assert data["example_id"] == list(range(2 * n + m))
    assert data["labels"] == [0, 1, 0] + [NO_LABEL] * (n + m)
    assert data["input_ids"][2 * n:] == tokenizer(UNLABELLED_ROWS)["input_ids"]
    first = transfer_set(tmp_path, tokenizer, max_unlabelled_examples=2).dataset.to_dict()
    assert first["input_ids"][n:] == tokenizer(UNLABELLED_ROWS[:2])["input_ids"]
    assert first["example_id"] == list(range(n + 2))


def test_a_text_only_file_needs_no_label_column(tmp_path, tokenizer):
    train, extra = write_files(tmp_path, unlabelled_header="sentence")
    config = config_from_dict({"data": {"train_file": str(train),
                                        "unlabelled_file": str(extra)}})
    data = get_task("classification").transfer_set(config, tokenizer).dataset
    assert data["labels"][len(TRAIN_ROWS):] == [NO_LABEL] * len(UNLABELLED_ROWS)


@pytest.mark.parametrize("header, rows, message", [
    ("text\tlabel", UNLABELLED_ROWS, r"data\.text_column: column 'sentence' is not in data "
                                     r"file .*unlabelled\.tsv"),
    ("sentence", [], r"data\.unlabelled_file: data file .*unlabelled\.tsv has no rows"),
    ("sentence\tlabel", ["fine", ""], r"data\.text_column: rows with example ids \[4\] have "
                                      r"no text"),
])
def test_bad_unlabelled_files_are_refused_by_name(tmp_path, tokenizer, header, rows, message):
    train, extra = write_files(tmp_path, unlabelled_header=header, unlabelled=rows)
    config = config_from_dict({"data": {"train_file": str(train),
                                        "unlabelled_file": str(extra)}})
    with pytest.raises(DataError, match=message):
        get_task("classification").transfer_set(config, tokenizer)


def test_a_missing_unlabelled_file_is_named(tmp_path, tokenizer):
    train, _ = write_files(tmp_path)
    config = config_from_dict({"data": {"train_file": str(train),
                                        "unlabelled_file": str(tmp_path / "nope.tsv")}})
    with pytest.raises(DataError, match=r"data\.unlabelled_file: file .*nope\.tsv does not"):
        get_task("classification").transfer_set(config, tokenizer)


@pytest.mark.parametrize("raw, message", [
    ({"task": "mlm"}, "data.unlabelled_file: expected null for task mlm"),
    ({"loss": {"alpha": 0.0}}, "loss.alpha is 0 throughout"),
    ({"data": {"max_unlabelled_examples": 0}}, "data.max_unlabelled_examples: expected an "
                                               "integer > 0"),
])
def test_impossible_unlabelled_settings_are_refused(raw, message):
    raw = {**raw, "data": {"unlabelled_file": "u.tsv", **raw.get("data", {})}}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(raw)


def test_unlabelled_rows_are_cached_with_the_teachers_logits(quick_demo, tmp_path):
    from kdscale.cache import LogitCache
    from kdscale.data import PaddingCollator
    from kdscale.data.batch import model_inputs
    from kdscale.models import load_model, load_tokenizer

    extra = tmp_path / "unlabelled.tsv"
    extra.write_text("sentence\n" + "".join(f"{t}\n" for t in UNLABELLED_ROWS))
    common = {"output_dir": str(tmp_path / "out"),
              "teacher": {"checkpoint": str(quick_demo / "teacher")},
              "cache": {"dir": str(tmp_path / "cache")}}
    path = write_config(tmp_path / "c.yaml", quick_demo, **common,
                        data={"unlabelled_file": str(extra)})
    result = kdscale("cache", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    originals = json.loads((quick_demo / "cache" / "manifest.json").read_text())["num_examples"]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_examples"] == originals + len(UNLABELLED_ROWS)
    config = config_from_dict(json.loads(path.read_text()))
    tokenizer = load_tokenizer(config.teacher_dir)
    data = get_task("classification").transfer_set(config, tokenizer, ["0", "1"])
    rows = [data.dataset[originals + i] for i in range(len(UNLABELLED_ROWS))]
    assert {row["labels"] for row in rows} == {NO_LABEL}
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        expected = load_model(config.teacher_dir).eval()(**model_inputs(batch)).logits
    cached = LogitCache(config.cache_dir).get(batch["example_id"])
    torch.testing.assert_close(cached.float(), expected, atol=2e-3, rtol=1e-3)  # fp16 storage
    # A student without the unlabelled rows is refused before anything is trained or written.
    plain = json.loads(write_config(tmp_path / "p.yaml", quick_demo, **common).read_text())
    plain["output_dir"] = str(tmp_path / "p")
    with pytest.raises(CacheMismatchError, match=r"masking: cache has \{'unlabelled'"):
        run_distill(config_from_dict(plain))
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("data", [{}, {"augment": {"copies": 2}},
                                  {"augment": {"copies": 1}, "max_unlabelled_examples": 3}])
def test_the_planner_counts_the_rows_the_transfer_set_holds(tmp_path, tokenizer, data):
    from kdscale.plan.estimates import transfer_set_rows

    config_data = transfer_set(tmp_path, tokenizer, **data)
    train, extra = tmp_path / "train.tsv", tmp_path / "unlabelled.tsv"
    config = config_from_dict({"data": {"train_file": str(train), "unlabelled_file": str(extra),
                                        **data}, "loss": {"alpha": 0.5}})
    assert transfer_set_rows(config.data) == len(config_data.dataset)

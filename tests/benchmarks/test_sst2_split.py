"""The SST-2 benchmark's held-out test split, on the real train.tsv: stratified, seeded, and
disjoint from the training rows by row and by text."""

from __future__ import annotations

import collections

import datasets
import pytest

from benchmarks.sst2.split import hold_out, ids_sha256, read_tsv, stratified_sample
from tests.support.sst2 import TRAIN

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI


def test_a_stratified_sample_keeps_each_labels_share_and_its_seed():
    labels = ["1"] * 700 + ["0"] * 290 + ["2"] * 10
    rows = stratified_sample(labels, 101, seed=3)
    counts = collections.Counter(labels[i] for i in rows)
    assert sum(counts.values()) == 101 and rows == sorted(set(rows))
    for label, share in (("1", 0.7), ("0", 0.29), ("2", 0.01)):
        assert abs(counts[label] - 101 * share) < 1, label
    assert stratified_sample(labels, 101, seed=3) == rows  # the same rows every time
    assert stratified_sample(labels, 101, seed=4) != rows


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return hold_out(TRAIN, tmp_path_factory.mktemp("split"), 1821, 0, "sentence", "label")


def test_held_out_rows_share_no_row_and_no_text_with_the_training_rows(split):
    _, source = read_tsv(TRAIN)
    header, train = read_tsv(split.train_file)
    _, test = read_tsv(split.test_file)
    assert header == ["label", "sentence", "source_row"]
    train_rows, test_rows = [int(r[2]) for r in train], [int(r[2]) for r in test]
    assert test_rows == split.test_rows and len(test_rows) == 1821
    assert not set(train_rows) & set(test_rows)
    assert sorted(train_rows + test_rows + split.dropped_rows) == list(range(len(source)))
    assert not {r[1] for r in train} & {r[1] for r in test}
    assert split.dropped_rows  # train.tsv repeats phrases: some go with their held-out twin
    for row in train[:50] + test[:50]:  # each row is its source row, unchanged
        assert source[int(row[2])] == row[:2]


def test_held_out_rows_keep_the_labels_shares(split):
    _, source = read_tsv(TRAIN)
    everywhere = collections.Counter(r[0] for r in source)
    held = collections.Counter(source[i][0] for i in split.test_rows)
    for label, count in everywhere.items():
        assert abs(held[label] - 1821 * count / len(source)) < 1, label


def test_the_split_is_the_same_on_every_run(split, tmp_path):
    again = hold_out(TRAIN, tmp_path, 1821, 0, "sentence", "label")
    assert again.test_rows == split.test_rows
    assert again.train_file.read_bytes() == split.train_file.read_bytes()
    other = hold_out(TRAIN, tmp_path / "other", 1821, 1, "sentence", "label")
    assert other.test_rows != split.test_rows


def test_a_row_hash_covers_every_row_even_from_a_dataset_column():
    """str() of a `datasets` column prints its first five ids and '...': the results of
    earlier versions hashed that, so any dev rows beginning 0-4 hashed alike."""
    column = datasets.Dataset.from_dict({"example_id": list(range(872))})["example_id"]
    assert ids_sha256(column) == ids_sha256(list(range(872)))
    assert ids_sha256(list(range(871)) + [900]) != ids_sha256(list(range(872)))

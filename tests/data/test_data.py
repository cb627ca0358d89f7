"""Task data from local files: tokenized, labelled, id'd and fingerprinted; batching and padding."""

import json
import random
from pathlib import Path

import pytest
import torch

from kdscale.commands.demo import build_demo_tokenizer
from kdscale.config import DataConfig
from kdscale.data import (
    DataError,
    LengthGroupedBatchSampler,
    PaddingCollator,
    load_raw,
    tokenize_labelled,
)

SST2 = Path(__file__).parents[2] / ".." / "shared" / "data" / "sst2"
ROWS = [("the movie was good .", 1), ('the " plot was dull .', 0), ("the cast was superb", 1),
        ("this film was not funny", 0), ("the ending felt fresh and witty", 1)]


def write_rows(path, rows, *, header=("sentence", "label")):
    """Rows as tsv, csv or jsonl, chosen by the file's extension."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r, strict=True))) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("".join(sep.join(map(str, r)) + "\n" for r in [header, *rows]))
    return path


def config(path, **kw):
    return DataConfig(train_file=str(path), **kw)


def texts_of(tokenizer, data):
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in data.dataset["input_ids"]]


@pytest.mark.parametrize("ext", ["tsv", "csv", "jsonl"])
def test_local_file_formats(tmp_path, tokenizer, ext):
    rows = ROWS if ext != "csv" else [r for r in ROWS if '"' not in r[0]]
    path = write_rows(tmp_path / f"train.{ext}", rows)
    data = tokenize_labelled(config(path), tokenizer, "train")
    assert data.label_names == ["0", "1"] and data.num_labels == 2
    assert data.dataset["labels"] == [label for _, label in rows]
    assert data.dataset["example_id"] == list(range(len(rows)))
    assert {"input_ids", "attention_mask", "labels", "example_id"} <= set(data.dataset.column_names)
    expected = [tokenizer(text)["input_ids"] for text, _ in rows]
    assert data.dataset["input_ids"] == expected


def test_tsv_keeps_bare_double_quote(tmp_path, tokenizer):
    # A field that starts with a quote is what a quoting csv reader would swallow.
    rows = [('" the movie was good', 1), ('the " plot was dull .', 0), ('a "b" c', 1), ("plain", 0)]
    cfg = config(write_rows(tmp_path / "t.tsv", rows))
    assert load_raw(cfg, "train")["sentence"] == [text for text, _ in rows]
    data = tokenize_labelled(cfg, tokenizer, "train")
    assert data.dataset["input_ids"] == [tokenizer(text)["input_ids"] for text, _ in rows]
    assert data.dataset["labels"] == [1, 0, 1, 0]


@pytest.mark.usefixtures("sst2")
def test_sst2_dev_tsv_rows():
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()
    text_column = lines[0].split("\t")[1]  # "sentence" in GLUE; some copies say "content"
    cfg = DataConfig(train_file=str(SST2 / "dev.tsv"), rename_columns={text_column: "sentence"})
    raw = load_raw(cfg, "train")
    assert len(raw) == len(lines) - 1 == 872  # no row swallowed by quote handling
    assert raw["sentence"] == [line.split("\t")[1] for line in lines[1:]]
    assert raw["label"].count(0) == 428 and raw["label"].count(1) == 444


def test_rename_columns(tmp_path, tokenizer):
    path = write_rows(tmp_path / "t.tsv", ROWS[:2], header=("content", "label"))
    with pytest.raises(DataError, match=r"column 'sentence' is not in .*'content'"):
        load_raw(config(path), "train")
    data = tokenize_labelled(config(path, rename_columns={"content": "sentence", "absent": "x"}),
                   tokenizer, "train")
    assert data.dataset["input_ids"] == [tokenizer(text)["input_ids"] for text, _ in ROWS[:2]]


def test_csv_with_byte_order_mark(tmp_path, tokenizer):
    path = tmp_path / "excel.csv"
    path.write_text("\ufeffsentence,label\nthe movie was good,1\n", encoding="utf-8")
    assert tokenize_labelled(config(path), tokenizer, "train").dataset["labels"] == [1]


def test_sentence_pair(tmp_path):
    tokenizer = build_demo_tokenizer()  # a BERT tokenizer returns segment ids: ask for them
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    rows = [("the movie", "the plot was bad", 0), ("the cast", "the lead was good", 1)]
    path = write_rows(tmp_path / "pairs.tsv", rows, header=("premise", "hypothesis", "label"))
    cfg = config(path, text_column="premise", text_pair_column="hypothesis")
    data = tokenize_labelled(cfg, tokenizer, "train")
    sep = tokenizer.sep_token_id
    columns = data.dataset["input_ids"], data.dataset["token_type_ids"]
    for ids, types, (a, b, _) in zip(*columns, rows, strict=True):
        assert ids.count(sep) == 2 and ids[0] == tokenizer.cls_token_id and ids[-1] == sep
        first_sep = ids.index(sep)
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        assert tokenizer.decode(ids[1:first_sep]) == a
        assert tokenizer.decode(ids[first_sep + 1:-1]) == b


def test_string_labels_sorted_and_reused_for_eval(tmp_path, tokenizer):
    rows = [("good", "pos"), ("bad", "neg"), ("great", "pos")]
    train = write_rows(tmp_path / "train.jsonl", rows)
    dev = write_rows(tmp_path / "dev.jsonl", [("dull", "neg"), ("fresh", "pos")])
    cfg = DataConfig(train_file=str(train), eval_file=str(dev))
    train_data = tokenize_labelled(cfg, tokenizer, "train")
    assert train_data.label_names == ["neg", "pos"]
    assert train_data.dataset["labels"] == [1, 0, 1]
    # Only "pos" in the eval file would map to 0 on its own; the train mapping keeps it 1.
    only_pos = write_rows(tmp_path / "pos.jsonl", [("fresh", "pos")])
    cfg.eval_file = str(only_pos)
    names = train_data.label_names
    assert tokenize_labelled(cfg, tokenizer, "eval", names).dataset["labels"] == [1]
    cfg.eval_file = str(dev)
    assert tokenize_labelled(cfg, tokenizer, "eval", names).dataset["labels"] == [0, 1]


def test_eval_label_unseen_in_train(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", [("good", "pos"), ("bad", "neg")])
    dev = write_rows(tmp_path / "dev.jsonl", [("dull", "neg"), ("okay", "meh")])
    cfg = DataConfig(train_file=str(train), eval_file=str(dev))
    names = tokenize_labelled(cfg, tokenizer, "train").label_names
    with pytest.raises(DataError, match=r"eval labels \['meh'\] are not among the training labels"):
        tokenize_labelled(cfg, tokenizer, "eval", names)


def test_example_id_stable_and_max_train_examples(tmp_path, tokenizer):
    path = write_rows(tmp_path / "t.tsv", ROWS)
    first, second = (tokenize_labelled(config(path), tokenizer, "train") for _ in range(2))
    assert first.dataset["example_id"] == second.dataset["example_id"] == list(range(len(ROWS)))
    assert first.dataset["input_ids"] == second.dataset["input_ids"]
    head = tokenize_labelled(config(path, max_train_examples=3), tokenizer, "train")
    assert head.dataset["example_id"] == [0, 1, 2]
    assert head.dataset["input_ids"] == first.dataset["input_ids"][:3]
    # max_eval_examples does not touch the train split
    head = tokenize_labelled(config(path, max_eval_examples=1), tokenizer, "train")
    assert len(head.dataset) == len(ROWS)


def test_fingerprint(tmp_path, tokenizer):
    def fingerprint(rows, **kw):
        path = write_rows(tmp_path / f"f{random.random()}.jsonl", rows)
        return tokenize_labelled(config(path, **kw), tokenizer, "train").fingerprint

    base = fingerprint(ROWS)
    assert fingerprint(ROWS) == base  # same data, another file and another tokenize_labelled
    relabeled = [ROWS[0], (ROWS[1][0], 1 - ROWS[1][1]), *ROWS[2:]]
    retokened = [ROWS[0], (ROWS[1][0].replace("dull", "flat"), ROWS[1][1]), *ROWS[2:]]
    changed = {fingerprint(relabeled), fingerprint(retokened), fingerprint(ROWS, max_length=64)}
    assert base not in changed and len(changed) == 3


@pytest.mark.parametrize("cfg_kw, fragment", [
    ({"train_file": "{tmp}/missing.tsv"}, r"data\.train_file: file .*missing\.tsv does not exist"),
    ({"train_file": "{tmp}/t.tsv", "eval_file": "{tmp}/dev.xlsx"},
     r"data\.eval_file: .*dev\.xlsx has extension '\.xlsx'; expected one of"),
    ({"train_file": "{tmp}/t.tsv", "label_column": "polarity"},
     r"data\.label_column: column 'polarity' is not in data file .*t\.tsv; "
     r"its columns are \['sentence', 'label'\]"),
    ({"train_file": "{tmp}/t.tsv", "text_column": "text"}, r"data\.text_column: column 'text'"),
    ({"train_file": "{tmp}/t.tsv", "text_pair_column": "hypothesis"},
     r"data\.text_pair_column: column 'hypothesis'"),
    ({}, r"set data\.train_file .* or data\.dataset"),
])
def test_data_errors(tmp_path, tokenizer, cfg_kw, fragment):
    write_rows(tmp_path / "t.tsv", ROWS)
    cfg = DataConfig(**{k: v.format(tmp=tmp_path) for k, v in cfg_kw.items()})
    with pytest.raises(DataError, match=fragment):
        tokenize_labelled(cfg, tokenizer, "train")


def lengths_for(n=2000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 128) for _ in range(n)]


def padding(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n, batch_size", [(2000, 16), (37, 8), (5, 8), (1, 1)])
def test_sampler_covers_every_index_once(n, batch_size):
    lengths = lengths_for(n)
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=3, group_batches=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert all(0 < len(b) <= batch_size for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(n))


def test_sampler_epochs_and_seeds():
    lengths = lengths_for()

    def order(seed, epoch, **kw):
        sampler = LengthGroupedBatchSampler(lengths, 16, seed=seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(5, 2) == order(5, 2)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    fixed = order(0, 0, shuffle=False)
    assert fixed == order(7, 3, shuffle=False)
    flat = [i for b in fixed for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_sampler_batches_are_length_homogeneous():
    lengths = lengths_for()
    grouped = list(LengthGroupedBatchSampler(lengths, 16, seed=0))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    plain = [order[i:i + 16] for i in range(0, len(order), 16)]
    assert padding(grouped, lengths) < 0.1 * padding(plain, lengths)
    # The batch order is still shuffled: not simply longest first.
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True)


def example(n, label=1, example_id=0, types=True):
    e = {"input_ids": list(range(10, 10 + n)), "attention_mask": [1] * n,
         "labels": label, "example_id": example_id}
    return {**e, "token_type_ids": [0] * n} if types else e


@pytest.mark.parametrize("multiple, width", [(None, 5), (1, 5), (4, 8), (8, 8), (5, 5)])
def test_collator_pads_to_batch_max(multiple, width):
    examples = [example(3, 0, 7), example(5, 1, 9), example(1, 1, 2 ** 40)]
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=multiple)(examples)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[name].shape == (3, width) and batch[name].dtype == torch.int64
    real = torch.tensor([[j < n for j in range(width)] for n in (3, 5, 1)])
    assert torch.equal(batch["attention_mask"], real.long())
    assert torch.equal(batch["input_ids"][~real], torch.zeros(int((~real).sum()), dtype=torch.long))
    assert batch["input_ids"][1, :5].tolist() == [10, 11, 12, 13, 14]
    assert batch["labels"].dtype == batch["example_id"].dtype == torch.int64
    assert batch["labels"].tolist() == [0, 1, 1]
    assert batch["example_id"].tolist() == [7, 9, 2 ** 40]


def test_collator_uses_pad_id_and_skips_absent_columns():
    batch = PaddingCollator(pad_token_id=99)([example(2, types=False), example(4, types=False)])
    assert "token_type_ids" not in batch
    assert batch["input_ids"][0].tolist() == [10, 11, 99, 99]

"""Token classification (NER): tag alignment to word pieces, entity-level F1, and the whole
finetune -> cache -> distill -> eval pipeline on the committed synthetic NER data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from kdscale.cache import LogitCache, read_manifest
from kdscale.cli import main
from kdscale.config import load_config
from kdscale.data import DataError, PaddingCollator, TaskData
from kdscale.data.batch import IGNORE_INDEX, model_inputs
from kdscale.tasks import get_task
from kdscale.tasks.entity_f1 import entities, entity_scores
from tests.support.token_data import (
    NER_CONFIG,
    NER_DATA,
    make_data_module,
    ner_config,
    write_class_label_parquet,
    write_jsonl,
)

TASK = get_task("token-classification")
ROWS = [{"tokens": ["Maria", "Papadopoulos", "visited", "Oslo", "."],
         "ner_tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
        {"tokens": ["Nothing", "happened", "."], "ner_tags": ["O", "O", "O"]}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(NER_DATA / "tokenizer"))


# -- entity extraction and scores ----------------------------------------------------------

@pytest.mark.parametrize(("tags", "want"), [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),  # B always starts one
    (["I-PER", "I-PER", "O", "I-ORG"], [("PER", 0, 2), ("ORG", 3, 4)]),  # IOB1
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # I- of another type
    (["PER", "PER", "O", "LOC", "ORG"], [("PER", 0, 2), ("LOC", 3, 4), ("ORG", 4, 5)]),
    (["O", "O"], []),
    ([], []),
])
def test_entities(tags, want):
    assert entities(tags) == want


def test_entity_scores_on_hand_counted_errors():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"],
            ["B-LOC", "I-LOC", "O"],
            ["O", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG", "O", "O"],  # right, wrong type, missed
                 ["B-LOC", "O", "O"],  # boundary error: one word of a two-word entity
                 ["O", "O"]]
    scores = entity_scores(gold, predicted)
    # 4 gold entities, 3 predicted, 1 right (the person).
    assert scores["entity_precision"] == pytest.approx(1 / 3)
    assert scores["entity_recall"] == pytest.approx(1 / 4)
    assert scores["entity_f1"] == pytest.approx(2 / 7)  # 2 * (1/3 * 1/4) / (1/3 + 1/4)
    assert scores["accuracy"] == pytest.approx(8 / 11)  # 3 of 11 words wrong
    assert (scores["entities"], scores["words"]) == (4, 11)


def test_entity_scores_edges():
    perfect = entity_scores([["B-PER", "I-PER"]], [["B-PER", "I-PER"]])
    assert (perfect["entity_f1"], perfect["accuracy"]) == (1.0, 1.0)
    nothing = entity_scores([["O", "O"]], [["O", "O"]])  # no entity either side: no F1
    assert (nothing["entity_f1"], nothing["accuracy"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


def test_metrics_score_each_word_at_its_first_piece():
    """A stub model predicts from the token id alone; the second piece of a word predicts
    B-PER, which must not count as an entity."""
    names = ["B-PER", "I-PER", "O"]
    table = torch.zeros(20, 3)
    for token, tag in ((2, 2), (3, 2), (0, 2), (10, 0), (11, 1), (12, 0), (13, 0)):
        table[token, tag] = 1.0
    model = _TableModel(table)
    batch = {"input_ids": torch.tensor([[2, 10, 11, 12, 3], [2, 13, 10, 3, 0]]),
             "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, 0, 1, -100, -100], [-100, 2, 0, -100, -100]])}
    scores = TASK.metrics(model, [batch], TaskData(None, names, ""))
    # gold PER(0,2) | PER(1,2); predicted PER(0,2) | PER(0,1), PER(1,2): 2 of 3 right.
    assert scores["entity_precision"] == pytest.approx(2 / 3)
    assert scores["entity_recall"] == 1.0
    assert scores["entity_f1"] == pytest.approx(0.8)
    assert scores["accuracy"] == pytest.approx(3 / 4)
    assert scores["examples"] == 2


class _TableModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])  # [B, L, tags]


# -- data: alignment, tag names, refusals --------------------------------------------------

def test_tag_goes_on_the_first_piece_only(tmp_path, tokenizer):
    config = ner_config(write_jsonl(tmp_path / "train.jsonl", ROWS),
                        write_jsonl(tmp_path / "dev.jsonl", ROWS[1:]))
    train = TASK.load_split(config, tokenizer, "train")
    assert train.label_names == ["B-LOC", "B-PER", "I-PER", "O"]  # sorted distinct tags
    first = train.dataset[0]
    pieces = tokenizer.convert_ids_to_tokens(first["input_ids"])
    assert pieces == ["[CLS]", "Maria", "Papa", "##dopo", "##ulos", "visited", "Oslo", ".",
                      "[SEP]"]
    assert first["labels"] == [-100, 1, 2, -100, -100, 3, 0, 3, -100]
    assert first["example_id"] == 0 and train.dataset[1]["example_id"] == 1
    # The eval split has only "O": mapped with the training names it is 3, not 0.
    dev = TASK.load_split(config, tokenizer, "eval", train.label_names)
    assert dev.dataset[0]["labels"] == [-100, 3, 3, 3, -100]


def test_truncation_keeps_the_tags_of_the_words_that_fit(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    train = TASK.load_split(ner_config(path, path, max_length=5), tokenizer, "train")
    assert train.dataset[0]["labels"] == [-100, 1, 2, -100, -100]  # [CLS] Maria Papa ##dopo [SEP]


def test_class_label_tags_map_by_name(tmp_path, tokenizer):
    """Hub-style tag ids: names come from the feature, and an eval split whose ClassLabel
    orders the names otherwise still gets the training ids."""
    train_names = ["O", "B-PER", "I-PER", "B-LOC"]
    train_path = write_class_label_parquet(tmp_path / "train.parquet", ROWS, train_names)
    dev_path = write_class_label_parquet(tmp_path / "dev.parquet", ROWS[:1],
                                         ["B-LOC", "B-PER", "I-PER", "O"])
    config = ner_config(train_path, dev_path)
    train = TASK.load_split(config, tokenizer, "train")
    assert train.label_names == train_names
    assert train.dataset[0]["labels"] == [-100, 1, 2, -100, -100, 0, 3, 0, -100]
    dev = TASK.load_split(config, tokenizer, "eval", train.label_names)
    assert dev.dataset[0]["labels"] == train.dataset[0]["labels"]


@pytest.mark.parametrize(("train_rows", "dev_rows", "message"), [
    ([ROWS[0], {"tokens": ["Anna", "visited"], "ner_tags": ["B-PER"]}], ROWS,
     r"train.jsonl, example id 1 has 2 words but 1 tags in column 'ner_tags'"),
    (ROWS, [{"tokens": ["Anna"], "ner_tags": ["B-MISC"]}],
     r"dev.jsonl, example id 0 has tag 'B-MISC', which is not among the training tags "
     r"\['B-LOC', 'B-PER', 'I-PER', 'O'\]"),
    ([{"tokens": "Anna visited Oslo", "ner_tags": ["B-PER", "O", "B-LOC"]}], ROWS,
     r"data.text_column: column 'tokens' of data file .*train.jsonl holds .*string.*; "
     r"expected a list per row"),
    ([{"tokens": ["Anna"], "ner_tags": "B-PER"}], ROWS,
     r"data.label_column: column 'ner_tags' .* expected a list per row"),
])
def test_bad_rows_are_refused_by_name(tmp_path, tokenizer, train_rows, dev_rows, message):
    config = ner_config(write_jsonl(tmp_path / "train.jsonl", train_rows),
                        write_jsonl(tmp_path / "dev.jsonl", dev_rows))
    with pytest.raises(DataError, match=message):
        names = TASK.load_split(config, tokenizer, "train").label_names
        TASK.load_split(config, tokenizer, "eval", names)


def test_committed_data_is_what_the_generator_writes(tokenizer):
    make_data = make_data_module()
    for name, rows in make_data.splits().items():
        lines = (NER_DATA / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows, name
    vocabulary = make_data.vocabulary()
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == vocabulary
    assert load_config(NER_CONFIG).teacher.config["vocab_size"] == len(vocabulary)


# -- the pipeline through the command line -------------------------------------------------

TINY = ["--teacher.config.hidden_size", "32", "--teacher.config.num_attention_heads", "2",
        "--teacher.config.intermediate_size", "64", "--finetune.max_steps", "200",
        "--distill.max_steps", "40", "--finetune.report_to", "none",
        "--distill.report_to", "none", "--eval.latency_batches", "1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """configs/ner_local.yaml with a tiny teacher, every stage run as a user runs it."""
    out = tmp_path_factory.mktemp("ner") / "run"
    overrides = ["--config", str(NER_CONFIG), "--output_dir", str(out),
                 "--teacher.tokenizer", str(NER_DATA / "tokenizer"),
                 "--data.train_file", str(NER_DATA / "train.jsonl"),
                 "--data.eval_file", str(NER_DATA / "dev.jsonl"), *TINY]
    for command in ("finetune", "cache", "distill", "eval"):
        assert main([command, *overrides]) == 0, command
    return SimpleNamespace(out=out, config=load_config(overrides[1], overrides[2:]))


def test_cache_holds_every_tag_at_every_word_start(pipeline):
    manifest = read_manifest(pipeline.out / "cache")
    tags = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    teacher = AutoConfig.from_pretrained(str(pipeline.out / "teacher"))
    assert TASK.label_names(teacher) == tags
    assert (manifest.kind, manifest.k, manifest.num_outputs) == ("topk", 7, 7)
    rows = [json.loads(line) for line in (NER_DATA / "train.jsonl").read_text().splitlines()]
    assert manifest.num_examples == len(rows)
    assert manifest.num_rows == sum(len(row["tokens"]) for row in rows)  # one per word


def test_cached_logits_are_the_teachers_at_word_starts(pipeline):
    teacher = AutoModelForTokenClassification.from_pretrained(str(pipeline.out / "teacher"))
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline.out / "teacher"))
    train = TASK.load_split(pipeline.config, tokenizer, "train", TASK.label_names(teacher.config))
    ids = [0, 1, 2, len(train.dataset) - 1]  # positions are ids: no row was dropped
    batch = PaddingCollator(tokenizer.pad_token_id)(train.rows(ids))
    with torch.no_grad():
        logits = teacher.eval()(**model_inputs(batch)).logits  # [B, L, tags]
    words = batch["labels"] != IGNORE_INDEX
    cached = LogitCache(pipeline.out / "cache").get_topk(ids)
    assert torch.equal(cached.counts, words.sum(dim=1))
    assert torch.equal(cached.positions, words.nonzero()[:, 1])
    dense = torch.full((len(cached.values), 7), float("nan"))
    dense.scatter_(1, cached.indices, cached.values.float())  # k = 7: every slot filled
    torch.testing.assert_close(dense, logits[words], atol=1e-4, rtol=1e-4)


def test_student_is_smaller_and_trained(pipeline):
    teacher = AutoModelForTokenClassification.from_pretrained(str(pipeline.out / "teacher"))
    student = AutoModelForTokenClassification.from_pretrained(str(pipeline.out / "student"))
    layers = (teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    assert layers == (4, 2)  # every_other: teacher layers 0 and 2
    history = json.loads((pipeline.out / "student" / "training_log.json").read_text())
    assert max(record["step"] for record in history) == 40
    # Distillation moved the weights it started from (the teacher's layer 2, copied).
    copied = teacher.bert.encoder.layer[2].output.dense.weight
    assert not torch.allclose(student.bert.encoder.layer[1].output.dense.weight, copied)


def test_eval_reports_entity_f1_of_both_models(pipeline):
    report = json.loads((pipeline.out / "report.json").read_text())
    assert report["metric"] == "entity_f1"
    for name in ("teacher", "student"):
        # 200 steps teach the tiny teacher most entities (F1 about 0.77 with this seed).
        assert 0.5 < report[name]["entity_f1"] <= 1.0, name
        assert report[name]["examples"] == 60
        assert report[name]["entity_precision"] > 0 and report[name]["entity_recall"] > 0
    assert report["retention"] == pytest.approx(
        report["student"]["entity_f1"] / report["teacher"]["entity_f1"])

"""Extractive question answering: windows and their labels, span decoding, the SQuAD scores,
the dense per-window cache, and finetune -> cache -> distill -> eval through the CLI."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from kdscale.config import ConfigError, load_config
from kdscale.data import DataError, make_loader
from kdscale.tasks.question_answering import PAD_LOGIT, QuestionAnswering
from kdscale.tasks.squad_metrics import (
    best_spans,
    exact_match,
    f1_score,
    normalize_answer,
    squad_scores,
)
from tests.support.qa_data import (
    LONG_CONTEXT,
    REPO,
    SQUAD,
    data_config,
    experiment,
    make_data_module,
    row,
    squad_tokenizer,
    write_rows,
)


def context_span(feature: dict) -> tuple[int, int]:
    """The characters of the context one window holds."""
    inside = [o for o in feature["offsets"] if o[0] >= 0]
    return inside[0][0], inside[-1][1]


def test_a_long_context_is_cut_into_overlapping_windows(tmp_path):
    rows = [row("Where was Clara born?", LONG_CONTEXT, "Oslo"),
            row("In which year was Ben born?", LONG_CONTEXT, "in 1990"),
            row("What is Anna's favourite colour?", "Anna's favourite colour is red.", "red")]
    config = data_config(write_rows(tmp_path / "train.jsonl", rows))  # max_length 32, stride 8
    features = QuestionAnswering().load_split(config, squad_tokenizer(), "train").dataset
    assert features["example_id"] == list(range(len(features)))
    windows = [f for f in features if f["source_id"] == 0]
    assert len(windows) == 4 and max(len(f["input_ids"]) for f in features) == 32
    for before, after in zip(windows[:-1], windows[1:], strict=True):
        tokens_before = [o for o in before["offsets"] if o[0] >= 0]
        tokens_after = [o for o in after["offsets"] if o[0] >= 0]
        assert tokens_before[-8:] == tokens_after[:8]  # doc_stride tokens shared
        assert tokens_after[8][0] > tokens_before[-1][0]  # and then it moves on
    assert context_span(windows[0])[0] == 0 and context_span(windows[-1])[1] == len(LONG_CONTEXT)
    for source, answer in ((0, "Oslo"), (1, "in 1990"), (2, "red")):
        start = rows[source]["answers"]["answer_start"][0]
        mine = [f for f in features if f["source_id"] == source]
        holding = [f for f in mine if f["labels"] != [0, 0]]
        assert holding, f"no window of example {source} holds its answer"
        for f in holding:
            first, last = f["labels"]
            text = rows[source]["context"][f["offsets"][first][0]:f["offsets"][last][1]]
            assert text == answer
        for f in mine:
            if f["labels"] == [0, 0]:  # [CLS]: the window does not hold all of the answer
                low, high = context_span(f)
                assert not (low <= start and start + len(answer) <= high)
    assert any(f["labels"] == [0, 0] for f in windows)


BAD = {
    "answer not at its start": ([row("Where was Ben born?", LONG_CONTEXT, "Rome", start=5)], {},
                                DataError, r"example id 1: answer 'Rome' does not match"),
    "no context": ([{"question": "Where was Ben born?", "context": None,
                     "answers": {"text": ["Rome"], "answer_start": [0]}}], {},
                   DataError, r"example id 1 has no context"),
    "unanswerable": ([{"question": "Where was Ben born?", "context": LONG_CONTEXT,
                       "answers": {"text": [], "answer_start": []}}], {},
                     DataError, r"example id 1 has no answer"),
    "question too long": ([row("Where was Ben born? What does Clara work as? What is Anna's "
                               "favourite colour?", LONG_CONTEXT, "Rome")], {"max_length": 24},
                          DataError, r"data.max_length: the question of example id 1 has 19"),
    "stride too long": ([], {"doc_stride": 32}, ConfigError, r"data.doc_stride: expected"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_rows_are_refused_naming_the_example(tmp_path, case):
    extra, data, error, message = BAD[case]
    rows = [row("Where was Clara born?", LONG_CONTEXT, "Oslo"), *extra]
    config = data_config(write_rows(tmp_path / "train.jsonl", rows), **data)
    with pytest.raises(error, match=message):
        QuestionAnswering().load_split(config, squad_tokenizer(), "train")


def test_a_slow_tokenizer_is_refused(tmp_path):
    from transformers import CanineTokenizer  # offsets-free, as every slow tokenizer is

    config = data_config(write_rows(tmp_path / "train.jsonl",
                                    [row("Where was Clara born?", LONG_CONTEXT, "Oslo")]))
    with pytest.raises(ConfigError, match="only fast tokenizers"):
        QuestionAnswering().load_split(config, CanineTokenizer(), "train")


def test_the_best_valid_span_is_chosen():
    """Context tokens 4..13; at most 3 tokens. Each tempting pair breaks one rule."""
    start, end = torch.zeros(2, 15), torch.zeros(2, 15)
    context = torch.zeros(2, 15, dtype=torch.bool)
    context[0, 4:14] = True
    start[0, 0], end[0, 0] = 40, 40  # [CLS]: 80
    start[0, 1], end[0, 2] = 50, 50  # question tokens: 100
    start[0, 10], end[0, 9] = 28, 28  # end before start: 56
    start[0, 4], end[0, 13] = 20, 20  # 10 tokens long: 40
    start[0, 6], end[0, 7] = 15, 15  # the best valid span: 30 (the next best scores 28)
    start[1] = end[1] = torch.arange(15.0)  # no context at all: no span
    starts, ends, scores = best_spans(start, end, context, max_answer_length=3)
    assert (starts[0].item(), ends[0].item(), scores[0].item()) == (6, 7, 30.0)
    assert scores[1].item() == float("-inf")
    # 10 tokens allowed: start 4 now reaches end 9 (6 tokens, 20 + 28), and end 13 (40)
    wider = best_spans(start, end, context, max_answer_length=10)
    assert (wider[0][0].item(), wider[1][0].item(), wider[2][0].item()) == (4, 9, 48.0)


def test_squad_normalization_and_scores():
    assert normalize_answer("  The Eiffel-Tower,  in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # an article only as a whole word
    assert exact_match("the Red house.", ["a red barn", "Red House"]) == 1.0
    assert exact_match("red houses", ["red house"]) == 0.0
    # "red house" vs "red barn": 1 common of 2 and 2 -> P = R = 1/2, F1 = 1/2
    assert f1_score("the red house", ["a red barn"]) == pytest.approx(0.5)
    # "in 1987 paris" vs "1987": P = 1/3, R = 1 -> F1 = 2 (1/3) / (4/3) = 1/2;
    # vs "born in 1987": P = 2/3, R = 2/3 -> F1 = 2/3, the better of the two
    assert f1_score("in 1987 Paris", ["1987", "born in 1987"]) == pytest.approx(2 / 3)
    assert f1_score("the", ["Paris"]) == 0.0  # normalizes to nothing
    scores = squad_scores({0: "Paris", 1: "blue sky"}, {0: ["paris"], 1: ["sky"], 2: ["red"]})
    # example 1: P = 1/2, R = 1 -> 2/3; example 2 has no prediction
    assert scores == pytest.approx({"exact_match": 1 / 3, "f1": (1 + 2 / 3 + 0) / 3,
                                    "examples": 3})


class ScriptedQA(torch.nn.Module):
    """Returns preset start/end logits per window, looked up by its tokens."""

    def __init__(self, logits: dict[tuple, torch.Tensor]):
        super().__init__()
        self.logits, self.weight = logits, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            preset = self.logits[tuple(ids[mask.bool()].tolist())]  # [2, n]
            rows.append(torch.nn.functional.pad(preset, (0, len(ids) - preset.shape[1])))
        logits = torch.stack(rows)
        return SimpleNamespace(start_logits=logits[:, 0], end_logits=logits[:, 1])


def test_metrics_take_the_best_span_over_all_windows(tmp_path):
    """The windows of one question point at different words; the highest score wins, in
    whichever window it is (here a middle one: neither the first nor the last), and is read
    from the context by its offsets. The second question's best-scoring tokens are in its
    question, which is never an answer."""
    contexts = [LONG_CONTEXT, "Anna was born in Paris."]
    path = write_rows(tmp_path / "dev.jsonl", [
        row("Where was Ben born?", contexts[0], "Rome", "in Rome"),
        row("Where was Anna born?", contexts[1], "Paris")])
    task, tok = QuestionAnswering(), squad_tokenizer()
    data = task.load_split(data_config(path, path), tok, "eval")
    logits, rome = {}, []
    for f in data.dataset:
        preset = torch.zeros(2, len(f["input_ids"]))
        text = contexts[f["source_id"]]
        words = {text[a:b]: i for i, (a, b) in enumerate(f["offsets"]) if a >= 0}
        rome += ["Rome" in words] if f["source_id"] == 0 else []
        for word, score in (("Rome", 5.0), ("Paris", 3.0), ("Oslo", 2.0)):
            if word in words:
                preset[:, words[word]] = score
        if f["source_id"] == 1:  # "anna" in the question outscores everything
            preset[:, 3] = 9.0
        logits[tuple(f["input_ids"])] = preset
    assert rome == [False, True, False, False]  # only a middle window holds the answer
    loader = make_loader(data, 3, task.collator(tok), shuffle=False)
    metrics = task.metrics(ScriptedQA(logits), loader, data)
    # Rome (10, window 2 of 4) beats Paris (6, window 1) and Oslo (4, windows 3 and 4); in
    # the second question, "anna" in the question (18) loses to "Paris" (6), its context's best
    assert metrics["examples"] == 2 and metrics["features"] == len(data.dataset) > 2
    assert metrics["exact_match"] == 1.0 and metrics["f1"] == 1.0


def test_dense_cache_round_trip_and_padding():
    task = QuestionAnswering()
    task.max_length = 8
    torch.manual_seed(0)
    outputs = SimpleNamespace(start_logits=torch.randn(2, 6) * 5, end_logits=torch.randn(2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": mask,
             "labels": torch.tensor([[1, 3], [0, 0]])}
    logits = task.label_logits(outputs, batch)  # [2, 2, 6]
    assert torch.equal(logits[:, 0][mask.bool()], outputs.start_logits[mask.bool()])
    assert torch.equal(logits[:, 1][mask.bool()], outputs.end_logits[mask.bool()])
    probs = torch.softmax(logits / 20.0, dim=-1)  # even at a high temperature
    assert torch.all(probs.masked_select(~mask.bool()[:, None, :]) == 0)
    stored = task.to_cache(logits, batch)
    assert stored.shape == (2, 16)
    assert torch.all(stored.view(2, 2, 8)[:, :, 6:] == PAD_LOGIT)
    stored = stored.half()  # as a float16 cache holds it
    assert torch.isfinite(stored).all()
    torch.testing.assert_close(task.from_cache(stored.float(), batch), logits,
                               rtol=1e-3, atol=1e-2)
    rows, labels = task.rows(logits, batch)  # start and end rows of each window, in order
    assert rows.shape == (4, 6) and labels.tolist() == [1, 3, 0, 0]
    teacher = task.cached_teacher({**batch, "teacher_logits": stored})["teacher_logits"]
    torch.testing.assert_close(teacher, rows, rtol=1e-3, atol=1e-2)


def test_finetune_cache_distill_eval_end_to_end(tmp_path, capsys):
    from kdscale.cache import LogitCache
    from kdscale.cli import main
    from kdscale.data.batch import model_inputs
    from kdscale.models import load_model, load_tokenizer

    config_path = tmp_path / "squad.yaml"
    config_path.write_text(json.dumps(experiment(tmp_path)))  # JSON is YAML
    for command in ("finetune", "cache", "distill", "eval"):
        assert main([command, "--config", str(config_path)]) == 0, capsys.readouterr().err
    config, task = load_config(config_path), QuestionAnswering()
    tok = load_tokenizer(config.teacher_dir)
    data = task.load_split(config, tok, "train")
    cache = LogitCache(config.cache_dir)
    assert len(cache) == len(data.dataset) > 60 and cache.manifest.num_outputs == 2 * 64
    teacher = load_model(config.teacher_dir, "teacher", model_class=task.model_class).eval()
    sources = Counter(data.dataset["source_id"])
    split = next(s for s, n in sources.items() if n > 1)  # a question of several windows
    windows = [i for i, s in enumerate(data.dataset["source_id"]) if s == split]
    for fid in (0, 1, 37, *windows):
        batch = task.collator(tok)(data.rows([fid]))
        with torch.no_grad():
            want = task.label_logits(teacher(**model_inputs(batch)), batch)  # [1, 2, n]
        stored = cache.get(torch.tensor([fid])).float()  # [1, 128]
        torch.testing.assert_close(task.from_cache(stored, batch), want, rtol=1e-3, atol=1e-2)
        assert torch.all(stored.view(2, 64)[:, want.shape[-1]:] == PAD_LOGIT)
    student = load_model(config.student_dir, "student", model_class=task.model_class)
    assert (student.config.num_hidden_layers, teacher.config.num_hidden_layers) == (1, 2)
    assert not torch.equal(student.qa_outputs.weight, teacher.qa_outputs.weight)  # trained
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metric"] == "f1"
    for name in ("teacher", "student"):
        assert 0.0 <= report[name]["exact_match"] <= report[name]["f1"] <= 1.0
        assert report[name]["examples"] == 20 and report[name]["features"] >= 20
    assert report["student"]["params"] < report["teacher"]["params"]


def test_committed_data_is_what_the_generator_writes(tmp_path):
    make_data_module().write_task(tmp_path)
    for name in ("train.jsonl", "dev.jsonl"):
        assert (tmp_path / name).read_bytes() == (SQUAD / name).read_bytes(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")).get_vocab() \
        == squad_tokenizer().get_vocab()


def test_configs_load_and_fit_the_tokenizer():
    local = load_config(REPO / "configs" / "squad_local.yaml")
    assert local.teacher.config["vocab_size"] == len(squad_tokenizer())
    hub = load_config(REPO / "configs" / "squad_bert.yaml")
    assert (hub.data.max_length, hub.data.doc_stride) == (384, 128)
    for name in ("squad_local", "squad_bert"):
        header = (REPO / "configs" / f"{name}.yaml").read_text().split("\ntask:")[0]
        for command in ("finetune", "cache", "distill", "eval"):
            assert f"kdscale {command}" in header and f"configs/{name}.yaml" in header

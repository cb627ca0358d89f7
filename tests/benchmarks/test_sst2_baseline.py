"""The plain recipe's engineering options (benchmarks/sst2/baseline.py), each checked for what
the ablation credits it with, on a tiny BERT and real SST-2 rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.sst2 import baseline
from benchmarks.sst2.ablation import cumulative
from tests.support.sst2 import TRAIN, tiny_pretrained_bert

pytestmark = pytest.mark.usefixtures("sst2")  # skips without ../shared/data, fails in CI
ROWS = 96
HP = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "precision": "fp32",
      "temperature": 2.0, "alpha": 0.5}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    return str(tiny_pretrained_bert(tmp_path_factory.mktemp("bert") / "model"))


def rows(pretrained: str, padding: str) -> baseline.TrainRows:
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    return baseline.load_train(str(TRAIN), tokenizer, 64, ROWS, padding)


def teacher(pretrained: str):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2).eval()


def options(**changes) -> dict:
    return baseline.options_of(changes)


def test_dynamic_padding_pads_each_batch_to_its_longest_row(pretrained):
    dynamic = rows(pretrained, "dynamic")
    loader = dynamic.loader(16, seed=1)
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        seen = sorted(int(r) for b in batches for r in b["row"])
        assert seen == list(range(ROWS))  # every row once an epoch
        for batch in batches:
            assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
    assert [b["row"].tolist() for b in epochs[0]] != [b["row"].tolist() for b in epochs[1]]
    widths = [b["input_ids"].shape[1] for b in epochs[0]]
    assert sum(widths) < len(widths) * 64 / 2 and min(widths) < max(widths)
    padded = next(iter(rows(pretrained, "max_length").loader(16, seed=1)))
    assert padded["input_ids"].shape[1] == 64  # the recipe as users run it today


def test_cached_teacher_logits_are_the_online_teachers_for_each_row(pretrained):
    model, data = teacher(pretrained), rows(pretrained, "dynamic")
    cached = baseline.teacher_logits(model, data, HP)
    batch = next(iter(data.loader(16, seed=2)))  # other batches, other widths than the cache's
    with torch.no_grad():
        online = model(**baseline.model_inputs(batch)).logits
    torch.testing.assert_close(cached[batch["row"]], online, rtol=1e-4, atol=1e-5)


def test_a_student_from_the_cache_trains_as_one_from_the_online_teacher(pretrained):
    data = rows(pretrained, "max_length")
    online, _ = baseline.distill_student(teacher(pretrained), [0, 1], data, HP, 1, options())
    cached = baseline.teacher_logits(teacher(pretrained), data, HP)
    offline, steps = baseline.distill_student(teacher(pretrained), [0, 1], data, HP, 1,
                                              options(teacher="cached"), cached)
    assert steps == ROWS // HP["batch_size"]
    for (name, a), b in zip(online.state_dict().items(), offline.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_frozen_embeddings_stay_the_teachers(pretrained):
    data, base = rows(pretrained, "dynamic"), teacher(pretrained)
    embeddings = base.get_input_embeddings().weight.clone()
    for freeze in (True, False):
        student, _ = baseline.distill_student(teacher(pretrained), [0, 1], data, HP, 1,
                                              options(freeze_embeddings=freeze))
        same = torch.equal(student.get_input_embeddings().weight, embeddings)
        assert same == freeze
        assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                               base.bert.encoder.layer[0].output.dense.weight)


def test_fused_adamw_is_an_option_and_torchs_default_is_not_fused(pretrained):
    model = teacher(pretrained)
    assert baseline.make_optimizer(model, 1e-3, fused=True).defaults["fused"] is True
    assert baseline.make_optimizer(model, 1e-3, fused=False).defaults["fused"] is None


def test_a_student_holds_the_chosen_teacher_layers(pretrained):
    model = teacher(pretrained)
    student = baseline.layers_student(model, [0, 3], freeze_embeddings=False)
    assert student.config.num_hidden_layers == 2
    for mine, theirs in ((0, 0), (1, 3)):
        torch.testing.assert_close(student.bert.encoder.layer[mine].state_dict(),
                                   model.bert.encoder.layer[theirs].state_dict())


def test_unknown_options_are_refused_by_name():
    with pytest.raises(SystemExit, match=r"baseline.padding: expected one of"):
        baseline.options_of({"padding": "longest"})


def test_ablation_steps_keep_the_steps_before_them():
    steps = cumulative([{"step": "today"}, {"step": "a", "padding": "dynamic"},
                        {"step": "b", "teacher": "cached"}])
    assert steps == [("today", {}), ("a", {"padding": "dynamic"}),
                     ("b", {"padding": "dynamic", "teacher": "cached"})]
    with pytest.raises(SystemExit, match="the first step is the baseline"):
        cumulative([{"step": "today", "padding": "dynamic"}])
    with pytest.raises(SystemExit, match="options among"):
        cumulative([{"step": "today"}, {"step": "a", "pading": "dynamic"}])

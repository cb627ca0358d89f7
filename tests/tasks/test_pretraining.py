"""BERT's pre-training heads distilled (task pretraining): sentence pairs drawn within
documents, the next-sentence label and logits carried as the [CLS] row beside the masked
tokens, that row's top-k cache, and a student distilled and evaluated on both heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kdscale.kernels import kd_loss_reference

from kdscale.cache import LogitCache
from kdscale.config import config_from_dict
from kdscale.models import load_tokenizer
from kdscale.plan.estimates import cache_estimate
from kdscale.plan.sizes import model_sizes
from kdscale.tasks import get_task
from kdscale.tasks.base import PAD_LOGIT
from kdscale.tasks.pretraining import IS_NEXT, NOT_NEXT, sentence_pairs
from tests.support.pipeline import distill_and_evaluate, kdscale, small_task_config

K = 8


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """configs/pretraining_local.yaml, smaller and shorter, its teacher trained and cached."""
    root = tmp_path_factory.mktemp("pretraining")
    path, config = small_task_config(
        "pretraining_local", root, data={"max_train_examples": 96, "max_eval_examples": 32},
        cache={"k": K, "shard_rows": 64, "batch_size": 16})
    for stage in ("finetune", "cache"):
        result = kdscale(stage, "--config", str(path), cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    return root, path, config


def prepared(config: dict):
    cfg = config_from_dict(config)
    return get_task("pretraining").load_split(cfg, load_tokenizer(cfg.teacher.tokenizer), "train")


def test_pairs_stay_within_documents_and_follow_the_seed():
    texts = ["a1", "a2", "a3", "", "b1", "b2", "", "", "c1"]
    ids = list(range(len(texts)))
    pairs = sentence_pairs(texts, ids, seed=0)
    assert pairs["example_id"] == [0, 1, 2, 4, 5, 8]  # blank rows only end documents
    successor = {"a1": "a2", "a2": "a3", "b1": "b2"}
    for a, b, label in zip(pairs["text"], pairs["text_pair"], pairs["next_sentence_label"],
                           strict=True):
        if label == IS_NEXT:
            assert successor[a] == b
        else:
            assert label == NOT_NEXT and b not in (a, successor.get(a))
    labels = [sentence_pairs(texts, ids, seed)["next_sentence_label"] for seed in range(40)]
    assert labels[0] == sentence_pairs(texts, ids, seed=0)["next_sentence_label"]
    for i, a in enumerate(pairs["text"]):  # the last of a document never has a next one
        drawn = [row[i] for row in labels]
        assert set(drawn) == ({IS_NEXT, NOT_NEXT} if a in successor else {NOT_NEXT})


def test_the_next_sentence_label_is_the_cls_row_and_the_rest_is_masked_lm(experiment):
    _, _, config = experiment
    data = prepared(config).dataset
    tokenizer = load_tokenizer(config["teacher"]["tokenizer"])
    lines = Path(config["data"]["train_file"]).read_text().splitlines()[:96]
    assert len(data) == sum(bool(line.strip()) for line in lines)  # a pair per sentence
    nsp = [row[0] for row in data["labels"]]
    assert set(nsp) == {IS_NEXT, NOT_NEXT}
    for row in data:
        assert row["input_ids"][0] == tokenizer.cls_token_id
        assert 1 in row["token_type_ids"]  # a second segment, sentence B
        masked = [i for i, label in enumerate(row["labels"]) if label != -100 and i > 0]
        assert masked and all(row["labels"][i] < len(tokenizer) for i in masked)


def test_a_padded_next_sentence_row_is_the_two_way_loss():
    """The [CLS] row is the 2 NSP logits padded with PAD_LOGIT to the vocabulary: its KL
    and cross-entropy equal those of the 2-way logits."""
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 2) * 3, torch.randn(5, 2) * 3
    labels = torch.tensor([0, 1, 1, 0, 1])

    def padded(logits):
        return torch.cat([logits, torch.full((5, 98), PAD_LOGIT)], dim=1)

    for temperature in (1.0, 2.0):
        two_way = kd_loss_reference(student, teacher, labels, temperature=temperature,
                                    alpha=0.7)
        wide = kd_loss_reference(padded(student), padded(teacher), labels,
                                 temperature=temperature, alpha=0.7)
        torch.testing.assert_close(wide, two_way)


def test_the_cache_holds_each_pairs_next_sentence_logits_at_cls(experiment):
    root, _, config = experiment
    cache = LogitCache(root / "run" / "cache")
    assert cache.manifest.masking["next_sentence"] == "next-or-random-0.5"
    data = prepared(config).dataset
    teacher = get_task("pretraining").from_pretrained(root / "run" / "teacher").eval()
    row = data[0]
    with torch.no_grad():
        out = teacher(input_ids=torch.tensor([row["input_ids"]]),
                      token_type_ids=torch.tensor([row["token_type_ids"]]))
    topk = cache.get_topk([row["example_id"]])
    assert topk.positions[0] == 0  # the [CLS] row comes first, then the masked tokens
    expected = out.seq_relationship_logits[0].sort(descending=True)
    torch.testing.assert_close(topk.values[0, :2].float(), expected.values,
                               atol=2e-3, rtol=2e-3)  # fp16 storage
    assert topk.indices[0, :2].tolist() == expected.indices.tolist()
    assert (topk.values[0, 2:].float() == PAD_LOGIT).all()
    masked = [i for i, label in enumerate(row["labels"]) if label != -100 and i > 0]
    assert topk.positions[1:].tolist() == masked
    torch.testing.assert_close(topk.values[1:].float(),
                               out.prediction_logits[0, masked].topk(K).values,
                               atol=2e-3, rtol=2e-3)
    # `kdscale env` sizes it beforehand: an upper bound (every pair full length), with one
    # row per example more than task mlm's estimate for the same text.
    planned = {**config, "cache": {**config["cache"], "dir": str(root / "x")}}
    estimate = {task: cache_estimate(cfg, model_sizes(cfg)) for task, cfg in (
        (task, config_from_dict({**planned, "task": task})) for task in ("pretraining", "mlm"))}
    assert sum(s["bytes"] for s in cache.manifest.shards) <= estimate["pretraining"]["bytes"]
    one_row_each = estimate["mlm"]["examples"] * (4 * K + 12)  # fp16 + uint16 per slot
    assert estimate["pretraining"]["bytes"] - estimate["mlm"]["bytes"] == one_row_each


def test_student_distils_both_heads_and_is_evaluated(experiment):
    root, path, _ = experiment
    log, report = distill_and_evaluate(root, path)
    assert all(r["soft"] > 0 and r["hard"] > 0 for r in log if "loss" in r)
    assert report["student"]["layers"] == 2 and report["teacher"]["layers"] == 4
    for model in ("teacher", "student"):
        assert 0 <= report[model]["next_sentence_accuracy"] <= 1
        assert report[model]["masked_tokens"] > 0 and report[model]["perplexity"] > 1
    assert "next-sentence accuracy" in (root / "run" / "report.md").read_text()


def test_a_masked_lm_cache_is_refused_for_pretraining(experiment):
    """Task mlm's cache of the same teacher and text has no next-sentence rows: its recipe
    differs, and distillation stops before training, naming it."""
    root, path, _ = experiment
    other = root / "mlm-cache"
    mlm = kdscale("cache", "--config", str(path), "--task", "mlm", "--cache.dir", str(other),
                  "--teacher.checkpoint", str(root / "run" / "teacher"), cwd=root)
    assert mlm.returncode == 0, mlm.stderr[-3000:]
    result = kdscale("distill", "--config", str(path), "--cache.dir", str(other),
                     "--output_dir", str(root / "other"), "--teacher.checkpoint",
                     str(root / "run" / "teacher"), cwd=root)
    assert result.returncode == 2
    assert "masking" in result.stderr and "next_sentence" in result.stderr

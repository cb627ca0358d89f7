"""Augmented copies (data.augment): drawn reproducibly, labelled by the teacher only, carried
by the soft term alone, cached once and refused when the copies differ."""

from __future__ import annotations

import json
import random

import pytest
import torch
from kdscale.kernels import kd_loss_reference
from transformers import BertTokenizerFast

from kdscale.cache import CacheMismatchError
from kdscale.commands.distill import run_distill
from kdscale.config import ConfigError, config_from_dict
from kdscale.config.schema import AugmentConfig
from kdscale.data.augment import NO_LABEL, noisy_copy
from kdscale.tasks import get_task
from kdscale.train.losses import KDLoss
from tests.support.pipeline import kdscale, write_config

TEXT = "a gripping and deeply moving film about two brothers"
VOCABULARY = ["dull", "bright", "slow"]


def copy_of(text: str, seed: int = 0, **probs) -> str:
    aug = AugmentConfig(**{"mask_prob": 0.0, "replace_prob": 0.0, "ngram_prob": 0.0, **probs})
    return noisy_copy(text, random.Random(seed), aug, VOCABULARY, "[MASK]")


def test_each_rule_does_what_it_says():
    assert copy_of(TEXT, mask_prob=1.0) == " ".join(["[MASK]"] * len(TEXT.split()))
    assert set(copy_of(TEXT, replace_prob=1.0).split()) <= set(VOCABULARY)
    for seed in range(20):  # a span of 1..max_ngram consecutive words
        span = copy_of(TEXT, seed, ngram_prob=1.0, max_ngram=3)
        assert 1 <= len(span.split()) <= 3 and f" {span} " in f" {TEXT} "
    assert copy_of(TEXT, mask_prob=0.3) != TEXT  # redrawn until it differs


def test_a_copy_is_the_same_for_the_same_seed_only():
    probs = {"mask_prob": 0.1, "replace_prob": 0.1, "ngram_prob": 0.25}
    assert copy_of(TEXT, 7, **probs) == copy_of(TEXT, 7, **probs)
    assert len({copy_of(TEXT, seed, **probs) for seed in range(10)}) > 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    words = sorted({w for line in TRAIN_ROWS for w in line.split()} | {"[MASK]"})
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


TRAIN_ROWS = ["a gripping film", "dull and slow", "bright moving story of two brothers",
              "slow"]


def transfer_set(tmp_path, tokenizer, **augment):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n"
                                                  for i, t in enumerate(TRAIN_ROWS)))
    config = config_from_dict({"data": {"train_file": str(path), "augment": augment},
                               "loss": {"alpha": 0.5}})
    return get_task("classification").transfer_set(config, tokenizer)


def test_the_transfer_set_holds_the_rows_then_their_unlabelled_copies(tmp_path, tokenizer):
    plain = transfer_set(tmp_path, tokenizer).dataset.to_dict()
    data = transfer_set(tmp_path, tokenizer, copies=2).dataset.to_dict()
    n = len(TRAIN_ROWS)
    assert data["example_id"] == [*range(n), *range(n, 2 * n), *range(2 * n, 3 * n)]
    assert data["labels"] == plain["labels"] + [NO_LABEL] * 2 * n
    assert data["input_ids"][:n] == plain["input_ids"]
    copies = data["input_ids"][n:]
    assert all(copy != original for copy, original in
               zip(copies, plain["input_ids"] * 2, strict=True))
    again = transfer_set(tmp_path, tokenizer, copies=2)
    assert list(again.dataset["input_ids"]) == data["input_ids"]  # every process builds the same
    assert transfer_set(tmp_path, tokenizer, copies=2, seed=1).fingerprint != again.fingerprint


def test_unlabelled_rows_carry_the_soft_term_only():
    torch.manual_seed(0)
    student = torch.randn(6, 3, requires_grad=True)
    teacher = torch.randn(6, 3)
    labels = torch.tensor([0, 2, NO_LABEL, 1, NO_LABEL, -100])
    temperature, alpha = 2.0, 0.7
    parts = KDLoss(temperature, alpha).parts(student, teacher, labels)
    soft = kd_loss_reference(student[:5], teacher[:5], None, temperature=temperature, alpha=1.0,
                             reduction="sum")
    labelled = torch.tensor([0, 1, 3])
    hard = torch.nn.functional.cross_entropy(student[labelled], labels[labelled],
                                             reduction="sum")
    want = (alpha * soft + (1 - alpha) * hard) / 5  # the mean is over all 5 rows
    torch.testing.assert_close(parts["loss"], want)
    parts["loss"].backward()
    assert student.grad[5].abs().sum() == 0  # the ignored row


@pytest.mark.parametrize("raw, message", [
    ({"task": "mlm", "data": {"augment": {"copies": 1}}}, "data.augment.copies: expected 0 "
                                                          "for task mlm"),
    ({"loss": {"alpha": 0.0}, "data": {"augment": {"copies": 1}}}, "loss.alpha is 0"),
    ({"data": {"augment": {"mask_prob": 1.5}}}, "data.augment.mask_prob: expected a "
                                                "probability"),
    ({"data": {"augment": {"mask_prob": 0.6, "replace_prob": 0.6}}},
     "data.augment.replace_prob: expected at most 1 - mask_prob = 0.4"),
])
def test_impossible_augment_settings_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(raw)


def test_copies_are_cached_once_and_other_copies_refused(quick_demo, tmp_path):
    """`kdscale cache` labels the copies with the teacher; distill reads them; a student of
    other copies (here none) is refused by name before any training."""
    common = {"output_dir": str(tmp_path / "out"),
              "teacher": {"checkpoint": str(quick_demo / "teacher")},
              "cache": {"dir": str(tmp_path / "cache")}}
    path = write_config(tmp_path / "c.yaml", quick_demo, **common,
                        data={"augment": {"copies": 2}})
    for stage in ("cache", "distill"):
        result = kdscale(stage, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "student" / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    originals = json.loads((quick_demo / "cache" / "manifest.json").read_text())["num_examples"]
    assert manifest["num_examples"] == 3 * originals
    assert manifest["masking"]["augment"]["copies"] == 2
    assert_copies_hold_the_teachers_logits(config_from_dict(json.loads(path.read_text())),
                                           originals)
    # In this process: the refusal comes before any model is trained or file written.
    plain = json.loads(write_config(tmp_path / "p.yaml", quick_demo, **common).read_text())
    plain["output_dir"] = str(tmp_path / "p")
    with pytest.raises(CacheMismatchError, match=r"masking: cache has \{'augment'"):
        run_distill(config_from_dict(plain))
    assert not (tmp_path / "p").exists()


def assert_copies_hold_the_teachers_logits(config, originals: int) -> None:
    from kdscale.cache import LogitCache
    from kdscale.data import PaddingCollator
    from kdscale.data.batch import model_inputs
    from kdscale.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_model(config.teacher_dir).eval()
    data = get_task("classification").transfer_set(config, tokenizer, ["0", "1"])
    rows = [data.dataset[i] for i in (3, originals + 3, 2 * originals + 3)]
    assert [row["labels"] for row in rows[1:]] == [NO_LABEL, NO_LABEL]
    batch = PaddingCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        expected = teacher(**model_inputs(batch)).logits
    cached = LogitCache(config.cache_dir).get(batch["example_id"])
    torch.testing.assert_close(cached.float(), expected, atol=2e-3, rtol=1e-3)  # fp16 storage

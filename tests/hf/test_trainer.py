"""DistillationTrainer in one process: the script conversion is four lines, batches carry the
cached logits of their own rows, the optimized loss is the reference loss with the step's
gradient that of the mean over the accumulation window, checkpoints hold the student alone
and resume, and bad input stops the run at start, naming the problem."""

from __future__ import annotations

import copy
import difflib
import json

import pytest
import torch
from kdscale.kernels import kd_loss_reference
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
)

from kdscale.cache import LogitCache, TeacherLogitsCollator
from kdscale.config import ConfigError
from kdscale.data.batch import model_inputs
from kdscale.data.tokenize import tokenized_fingerprint
from kdscale.errors import KdscaleError
from kdscale.hf import DistillationArguments, DistillationTrainingArguments
from tests.support.hf import (
    EXAMPLE,
    N_TRAIN,
    build_cache,
    make_trainer,
    save_model,
    tiny_bert,
    tokenized_train,
)
from tests.support.hf import make_task as _make_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return _make_task(tmp_path_factory.mktemp("hf_task"))


@pytest.fixture(scope="module")
def tokenizer(task):
    return AutoTokenizer.from_pretrained(task.student)


def test_the_converted_script_differs_from_the_stock_one_in_four_lines():
    stock, distill = ((EXAMPLE / name).read_text().splitlines()
                      for name in ("run_glue.py", "run_glue_distill.py"))
    matcher = difflib.SequenceMatcher(None, stock, distill, autojunk=False)
    changes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in changes)
    assert 1 <= changed <= 4, changes
    new_lines = "\n".join(line for _, _, _, j1, j2 in changes for line in distill[j1:j2])
    assert "from kdscale.hf import" in new_lines and "DistillationTrainer(" in new_lines
    assert "    end_process()" in new_lines  # the launched processes' end
    assert "Trainer(" not in "\n".join(distill).replace("DistillationTrainer(", "")


def test_arguments_parse_beside_the_scripts_own_with_help_and_checks(task):
    parser = HfArgumentParser((TrainingArguments, DistillationArguments))
    help_text = " ".join(parser.format_help().split())
    assert "--kd_temperature" in help_text and "alpha * T^2 * KL" in help_text
    training, kd = parser.parse_args_into_dataclasses(
        ["--output_dir", "o", "--kd_cache", str(task.cache), "--kd_temperature", "4",
         "--kd_alpha", "0.7", "--kd_layer_map", '{"0": 1, "1": 3}'])
    assert (kd.kd_cache, kd.kd_temperature, kd.kd_alpha) == (str(task.cache), 4.0, 0.7)
    assert kd.layer_map() == {"0": 1, "1": 3}
    (merged,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "o", "--kd_teacher", "t", "--kd_teacher_placement", "zero3"])
    assert isinstance(merged, TrainingArguments) and merged.kd_teacher_placement == "zero3"
    bad = {"--kd_alpha": ["--kd_alpha", "1.5"], "--kd_temperature": ["--kd_temperature", "0"],
           "--kd_layer_map": ["--kd_layer_map", "[0, 1]"],
           "--kd_hidden_mse": ["--kd_hidden_mse", "-1"],
           "--kd_cache and --kd_teacher": ["--kd_cache", "c", "--kd_teacher", "t"]}
    for name, argv in bad.items():
        with pytest.raises(ConfigError, match=name):
            HfArgumentParser(DistillationArguments).parse_args_into_dataclasses(argv)


def test_batches_carry_their_rows_cached_logits_and_the_loss_is_the_reference(
        task, tokenizer, tmp_path):
    kd = {"kd_cache": str(task.cache), "kd_temperature": 3.0, "kd_alpha": 0.7}
    trainer = make_trainer(task, tokenizer, tmp_path, kd)
    batch = next(iter(trainer.get_train_dataloader()))
    ids = batch["example_id"]
    assert len(ids) == 16 and len(set(ids.tolist())) == 16
    assert torch.equal(batch["teacher_logits"], LogitCache(task.cache).get(ids))
    # An id is the row's number in the training file: the rows `kdscale cache` numbered.
    rows = task.train_file.read_text().splitlines()
    for i, example in enumerate(ids.tolist()):
        expected = tokenizer(json.loads(rows[example])["sentence"], truncation=True,
                             max_length=64)["input_ids"]
        assert batch["input_ids"][i, :len(expected)].tolist() == expected

    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(16))
    reference = kd_loss_reference(model(**model_inputs(batch)).logits, batch["teacher_logits"],
                                  batch["labels"], temperature=3.0, alpha=0.7)
    torch.testing.assert_close(loss, reference)
    # The divisor is the window's rows (here a window of two such batches), not this batch's.
    half = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(32))
    torch.testing.assert_close(half, reference / 2)


def test_the_collator_wraps_any_base_collator_for_dense_and_topk_caches(task, tokenizer,
                                                                         tmp_path):
    features = tokenized_train(task, tokenizer).remove_columns(["sentence"])
    features = features.add_column("example_id", list(range(N_TRAIN))).select([5, 0, 9]).to_list()
    padding = DataCollatorWithPadding(tokenizer)

    def inputs_only(rows):  # a base collator that drops what the model does not take
        return {k: v for k, v in padding(rows).items() if k != "example_id"}

    dense = LogitCache(task.cache)
    batch = TeacherLogitsCollator(inputs_only, dense)(features)
    assert batch["example_id"].tolist() == [5, 0, 9]
    assert torch.equal(batch["teacher_logits"], dense.get([5, 0, 9]))
    topk_dir = build_cache(task.teacher, task.train_file, tmp_path / "topk", kind="topk")
    batch = TeacherLogitsCollator(padding, LogitCache(topk_dir))(features)
    best = dense.get([5, 0, 9]).topk(1, dim=-1)
    assert torch.equal(batch["teacher_topk_indices"], best.indices)
    assert torch.equal(batch["teacher_topk_values"], best.values)
    # The trainer's loss takes dense logits: a top-k cache is refused at start.
    with pytest.raises(KdscaleError, match="holds top-1 logits"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(topk_dir)})


def _window_dataset(task, tokenizer):
    """16 rows, 5 without a label: micro-batches of 4 cannot hold equal labelled rows."""
    unlabelled = {1, 2, 3, 7, 11}
    rows = tokenized_train(task, tokenizer).select(range(16))
    return rows.map(lambda row, i: {"label": -100 if i in unlabelled else row["label"]},
                    with_indices=True)


def _sgd_update(task, tokenizer, out, batch_size: int, accumulation: int) -> dict:
    trainer = make_trainer(task, tokenizer, out, {"kd_cache": str(task.cache), "kd_alpha": 0.3},
                           train=_window_dataset(task, tokenizer), max_steps=1, optim="sgd",
                           learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
                           weight_decay=0.0, per_device_train_batch_size=batch_size,
                           gradient_accumulation_steps=accumulation)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    return {k: v - before[k] for k, v in trainer.model.state_dict().items()}


def test_accumulating_four_batches_is_one_batch_of_their_rows(task, tokenizer, tmp_path):
    one, four = (_sgd_update(task, tokenizer, tmp_path / f"ga{n}", 16 // n, n) for n in (1, 4))
    # The update SGD must make: -lr * the gradient of the reference loss averaged over the
    # window's 11 labelled rows, whichever micro-batch each is in.
    model = AutoModelForSequenceClassification.from_pretrained(task.student).train()
    rows = _window_dataset(task, tokenizer).remove_columns(["sentence"])
    batch = DataCollatorWithPadding(tokenizer)(rows.to_list())
    teacher = LogitCache(task.cache).get(list(range(16)))
    kd_loss_reference(model(**model_inputs(batch)).logits, teacher, batch["labels"],
                      temperature=2.0, alpha=0.3).backward()
    expected = {name: -0.5 * p.grad for name, p in model.named_parameters()}
    assert any(g.abs().max() > 1e-4 for g in expected.values())
    for name, update in expected.items():
        torch.testing.assert_close(one[name], update, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(four[name], update, rtol=1e-4, atol=1e-7)


def test_logs_split_the_loss_into_its_soft_and_hard_parts(task, tokenizer, tmp_path):
    trainer = make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache),
                                                       "kd_alpha": 0.25})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for h in logs:
        assert h["kd_soft"] > 0 and h["kd_hard"] > 0
        assert h["loss"] == pytest.approx(0.25 * h["kd_soft"] + 0.75 * h["kd_hard"], rel=1e-4)


def test_checkpoints_hold_the_student_alone_and_training_resumes(task, tokenizer, tmp_path):
    kd, settings = {"kd_teacher": str(task.teacher)}, {"save_strategy": "steps", "save_steps": 2}
    full = make_trainer(task, tokenizer, tmp_path / "full", kd, **settings)
    full.train()
    student = AutoModelForSequenceClassification.from_pretrained(task.student).state_dict()
    saved = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in student.items()}
    assert not any("layer.2." in k or "layer.3." in k for k in saved)  # the teacher's 4 layers

    resumed = make_trainer(task, tokenizer, tmp_path / "resumed", kd, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    # The history comes back with the checkpoint (steps 1-2); steps 3-4 are trained again
    # and repeat the uninterrupted run's.
    steps = [(h["step"], h["loss"], h["kd_soft"]) for h in resumed.state.log_history
             if "loss" in h]
    expected = [(h["step"], h["loss"], h["kd_soft"]) for h in full.state.log_history
                if "loss" in h]
    assert [s for s, _, _ in steps] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(expected), rtol=1e-5, atol=0)
    final = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    for name, weight in load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors").items():
        torch.testing.assert_close(final[name], weight)


def test_intermediate_losses_from_a_live_teacher_are_logged(task, tokenizer, tmp_path):
    kd = {"kd_teacher": str(task.teacher), "kd_hidden_mse": 1.0, "kd_attention_kl": 0.5,
          "kd_layer_map": '{"0": 1, "1": 3}'}
    trainer = make_trainer(task, tokenizer, tmp_path, kd, max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["kd_hidden_mse"] > 0 and h["kd_attention_kl"] > 0 for h in logs)
    for h in logs:
        parts = 0.5 * h["kd_soft"] + 0.5 * h["kd_hard"] + h["kd_hidden_mse"]
        assert h["loss"] == pytest.approx(parts + 0.5 * h["kd_attention_kl"], rel=1e-4)


# -- bad input: stopped at start, the problem named ---------------------------------------------


def test_a_cache_that_misses_training_rows_is_refused(task, tokenizer, tmp_path):
    short = build_cache(task.teacher, task.train_file, tmp_path / "cache48", max_examples=48)
    with pytest.raises(KdscaleError, match=f"does not cover the training set: 16 of its "
                                           f"{N_TRAIN} example ids are not cached"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(short)})


def _reversed(rows: list[str]) -> list[str]:
    return rows[::-1]


def _one_label_flipped(rows: list[str]) -> list[str]:
    last = json.loads(rows[-1])
    return rows[:-1] + [json.dumps(last | {"label": 1 - last["label"]})]


def _one_word_added(rows: list[str]) -> list[str]:
    first = json.loads(rows[0])
    return [json.dumps(first | {"sentence": first["sentence"] + " really"})] + rows[1:]


@pytest.mark.parametrize("edit", [_reversed, _one_label_flipped, _one_word_added])
def test_a_cache_of_another_file_with_as_many_rows_is_refused(task, tokenizer, tmp_path, edit):
    """The same row count and ids, other rows: covering the ids is not enough."""
    rows = task.train_file.read_text().splitlines()
    other = tmp_path / f"other{task.train_file.suffix}"
    other.write_text("\n".join(edit(rows)) + "\n")
    cache = build_cache(task.teacher, other, tmp_path / "other_cache")
    with pytest.raises(KdscaleError, match="was built from other data than train_dataset: the "
                                           "rows' tokens or labels differ"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(cache)})


def test_the_stock_scripts_rows_have_the_caches_fingerprint(task, tokenizer):
    """The check above accepts the cache of the very file the script reads: kdscale's data
    fingerprint, recomputed from the script's tokenization (padding left out)."""
    manifest = LogitCache(task.cache).manifest
    rows = tokenized_train(task, tokenizer).add_column("example_id", list(range(N_TRAIN)))
    assert tokenized_fingerprint(rows, manifest.max_length) == manifest.data_fingerprint
    padded = rows.map(lambda b: tokenizer.pad(b, padding="max_length", max_length=48),
                      batched=True)
    assert tokenized_fingerprint(padded, manifest.max_length) == manifest.data_fingerprint


def test_rows_without_example_ids_are_refused_when_ids_cannot_be_derived(task, tokenizer,
                                                                         tmp_path):
    shuffled = tokenized_train(task, tokenizer).shuffle(seed=0)
    with pytest.raises(KdscaleError, match="no 'example_id' column, and its rows were reordered"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)}, train=shuffled)
    plain = tokenized_train(task, tokenizer).remove_columns(["sentence"]).to_list()
    with pytest.raises(KdscaleError, match=r"train_dataset \(_ListDataset\) has no 'example_id'"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)},
                     train=_ListDataset(plain))
    # With the ids given, the same shuffled rows are fine: the ids say which rows they are.
    numbered = tokenized_train(task, tokenizer).add_column("example_id", list(range(N_TRAIN)))
    make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)},
                 train=numbered.shuffle(seed=0))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_a_teacher_or_cache_with_other_labels_is_refused(task, tokenizer, tmp_path):
    three = save_model(tiny_bert(layers=2, num_labels=3), tmp_path / "three_labels")
    with pytest.raises(KdscaleError, match="has 3 labels and the student 2"):
        make_trainer(task, tokenizer, tmp_path, {"kd_teacher": str(three)})
    with pytest.raises(KdscaleError, match="has 3 labels and the student 2"):
        make_trainer(task, tokenizer, tmp_path, {}, teacher=tiny_bert(layers=2, num_labels=3))
    student = AutoModelForSequenceClassification.from_pretrained(three)
    with pytest.raises(KdscaleError, match="holds 2 logits per example, but the student has 3"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)}, model=student)


def test_missing_or_conflicting_teacher_settings_are_refused(task, tokenizer, tmp_path):
    with pytest.raises(KdscaleError, match="no teacher: set --kd_cache"):
        make_trainer(task, tokenizer, tmp_path, {})
    with pytest.raises(KdscaleError, match="give one teacher source"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)},
                     teacher=tiny_bert(layers=2))
    with pytest.raises(KdscaleError, match="need the teacher's hidden states"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache),
                                                 "kd_hidden_cosine": 1.0})

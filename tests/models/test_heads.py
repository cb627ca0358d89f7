"""A masked LM's head on the masked rows alone: the same logits and gradients as the head
on every position followed by the row selection, and a model left as it was."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from kdscale.models.heads import head_on_rows, lm_head
from kdscale.tasks import get_task


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    input_ids = torch.randint(5, 300, (3, 12))
    labels = torch.full((3, 12), -100)
    labels[0, [2, 5]], labels[1, 7], labels[2, [1, 3, 11]] = 9, 40, 77
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   "labels": labels}


def test_the_rows_get_the_logits_and_gradients_of_the_whole_head():
    model, batch = _model_and_batch()
    rows = batch["labels"] != -100
    full = model(input_ids=batch["input_ids"]).logits
    loss_full = torch.nn.functional.cross_entropy(full[rows], batch["labels"][rows])
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()))
    with head_on_rows(model, rows):
        cut = model(input_ids=batch["input_ids"]).logits
    assert cut.shape == (int(rows.sum()), 300)
    torch.testing.assert_close(cut, full[rows])
    loss_cut = torch.nn.functional.cross_entropy(cut, batch["labels"][rows])
    for got, want in zip(torch.autograd.grad(loss_cut, list(model.parameters())), grads_full,
                         strict=True):
        torch.testing.assert_close(got, want)
    assert model(input_ids=batch["input_ids"]).logits.shape == (3, 12, 300)  # hook removed


def test_the_mlm_task_reads_the_same_rows_either_way():
    model, batch = _model_and_batch(1)
    task = get_task("mlm")
    full_rows, full_labels = task.rows(task.label_logits(model(input_ids=batch["input_ids"]),
                                                         batch), batch)
    with task.head_context(model, batch):
        outputs = model(input_ids=batch["input_ids"])
    rows, labels = task.rows(task.label_logits(outputs, batch), batch)
    torch.testing.assert_close(rows, full_rows)
    assert torch.equal(labels, full_labels)


def test_a_model_without_an_lm_head_is_refused_by_name():
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8,
                                                     num_hidden_layers=1, num_attention_heads=1,
                                                     intermediate_size=8))
    assert lm_head(model) is None
    with pytest.raises(ValueError, match="BertForSequenceClassification has no LM head"):
        with head_on_rows(model, torch.ones(1, 2, dtype=torch.bool)):
            pass

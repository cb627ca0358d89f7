"""KDLoss, the module training calls: one `kd_loss_terms` call gives the loss and its terms."""

import torch
from kdscale.kernels import kd_loss_reference

from kdscale.data.augment import NO_LABEL
from kdscale.train import losses
from kdscale.train.losses import KDLoss


def test_parts_make_one_loss_call_that_agrees_with_two_plain_ones(monkeypatch):
    calls = []
    terms = losses.kd_loss_terms
    counted = lambda *args, **kw: calls.append(kw) or terms(*args, **kw)  # noqa: E731
    monkeypatch.setattr(losses, "kd_loss_terms", counted)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(8, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(8, 5, generator=gen)
    labels = torch.tensor([0, 4, NO_LABEL, 2, -100, NO_LABEL, 1, 3])
    parts = KDLoss(temperature=3.0, alpha=0.4).parts(student, teacher, labels)
    assert len(calls) == 1 and calls[0]["soft_only_index"] == NO_LABEL
    rows = 7  # every row but the ignored one; NO_LABEL rows count in the mean
    soft = kd_loss_reference(student, teacher, labels.masked_fill(labels == NO_LABEL, 0),
                             temperature=3.0, alpha=1.0, reduction="sum") / rows
    hard = kd_loss_reference(student, teacher, labels.masked_fill(labels == NO_LABEL, -100),
                             temperature=3.0, alpha=0.0, reduction="sum") / rows
    torch.testing.assert_close(parts["soft"], soft)
    torch.testing.assert_close(parts["hard"], hard)
    torch.testing.assert_close(parts["loss"], 0.4 * soft + 0.6 * hard)
    grad, = torch.autograd.grad(parts["loss"], student)
    want, = torch.autograd.grad(0.4 * soft + 0.6 * hard, student)
    torch.testing.assert_close(grad, want)

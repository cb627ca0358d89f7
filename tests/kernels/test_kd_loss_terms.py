"""The call training makes: ``kd_loss_terms`` (loss, soft and hard terms) in one launch of the
kernel, against the reference; rows that only the teacher labelled; the backward's rounding.

On CPU the kernel runs in Triton's interpreter (see conftest.py): fp32, small shapes.
"""

import importlib

import pytest
import torch
from kdscale.kernels import kd_loss_reference, kd_loss_terms_reference, kd_loss_terms_triton

from tests.kernels.test_kd_loss import DEVICE, _gen, _labels, _logits, _tol, _topk

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
SOFT_ONLY = -1  # the label of a copy that only the teacher labelled, as kdscale.data.augment


def _fused():
    """The kernel's module, imported inside a test: after conftest.py chose the interpreter."""
    return importlib.import_module("kdscale.kernels.fused")


def _case(vocab, rows, teacher, seed=0):
    """Inputs with a quarter of the rows ignored and a quarter labelled by the teacher only."""
    g = _gen(seed + vocab)
    s, t = _logits((rows, vocab), g), _logits((rows, vocab), g)
    y = _labels(rows, vocab, g, n_ignored=rows // 4)
    y[rows // 4: rows // 2] = SOFT_ONLY
    kw = dict(labels=y, soft_only_index=SOFT_ONLY)
    if teacher == "dense":
        return s, dict(kw, teacher_logits=t)
    values, indices = _topk(t, min(vocab, 8), g, n_pad=2)
    return s, dict(kw, teacher_topk_values=values, teacher_topk_indices=indices)


def _terms_and_grad(terms_fn, student, upstream, **kw):
    s = student.detach().clone().requires_grad_()
    out = terms_fn(s, **kw)
    (grad,) = torch.autograd.grad(out.loss, s, upstream)
    return out, grad


@pytest.mark.parametrize("vocab, rows, temperature, alpha, teacher, reduction", [
    (3, 17, 2.0, 0.5, "dense", "mean"),
    (3, 9, 4.0, 0.0, "topk", "sum"),
    (1271, 8, 1.0, 1.0, "dense", "none"),
    (1271, 8, 2.0, 0.7, "topk", "mean"),
])
def test_terms_match_the_reference(vocab, rows, temperature, alpha, teacher, reduction):
    s, kw = _case(vocab, rows, teacher)
    kw.update(temperature=temperature, alpha=alpha, reduction=reduction)
    shape = (rows,) if reduction == "none" else ()
    upstream = (torch.randn(shape, generator=_gen(1)) + 2.0).to(DEVICE)
    got, grad = _terms_and_grad(kd_loss_terms_triton, s, upstream, **kw)
    want, grad_want = _terms_and_grad(kd_loss_terms_reference, s, upstream, **kw)
    for name in ("loss", "soft", "hard"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **_tol(temperature))
    torch.testing.assert_close(grad, grad_want, **_tol(temperature))
    assert not got.soft.requires_grad and not got.hard.requires_grad


def test_loss_is_the_weighted_sum_of_its_terms_and_soft_only_rows_have_no_hard_term():
    s, kw = _case(1271, 8, "dense")
    out = kd_loss_terms_triton(s, temperature=2.0, alpha=0.3, reduction="none", **kw)
    torch.testing.assert_close(out.loss, 0.3 * out.soft + 0.7 * out.hard, rtol=1e-6, atol=1e-6)
    soft_only, ignored = kw["labels"] == SOFT_ONLY, kw["labels"] == -100
    assert (out.hard[soft_only] == 0).all() and (out.soft[soft_only] > 0).all()
    assert (out.loss[ignored] == 0).all() and (out.soft[ignored] == 0).all()
    # The reference built from plain kd_loss calls: soft rows at alpha 1, labelled at alpha 0.
    labels = kw.pop("labels").clone()
    kw.pop("soft_only_index")
    soft = kd_loss_reference(s, labels=labels.masked_fill(soft_only, 0), alpha=1.0,
                             temperature=2.0, reduction="none", **kw)
    hard = kd_loss_reference(s, labels=labels.masked_fill(soft_only, -100), alpha=0.0,
                             temperature=2.0, reduction="none", **kw)
    torch.testing.assert_close(out.soft, soft, **_tol(2.0))
    torch.testing.assert_close(out.hard, hard, **_tol(2.0))


def test_forward_and_backward_take_one_launch(monkeypatch):
    launches = []
    fused = _fused()
    launch = fused._launch
    monkeypatch.setattr(fused, "_launch", lambda *a: launches.append(1) or launch(*a))
    s, kw = _case(1271, 8, "topk")
    s.requires_grad_()
    out = kd_loss_terms_triton(s, temperature=2.0, alpha=0.5, **kw)
    out.loss.backward()
    assert len(launches) == 1 and s.grad is not None and float(out.soft) > 0


def test_a_term_of_weight_zero_cannot_make_the_loss_nan():
    s, kw = _case(3, 9, "dense")
    kw["labels"][kw["labels"] >= 0] = 5  # out of range: the kernel's CE is NaN (no raising)
    s.requires_grad_()
    out = kd_loss_terms_triton(s, alpha=1.0, **kw)
    assert torch.isfinite(out.loss) and torch.isnan(out.hard)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()


def test_backward_scales_in_fp32_and_rounds_once():
    """The stored bf16 gradient times an fp32 1 / rows, rounded once: a bf16 factor would
    round 1 / 7 first and move many elements by one bf16 step."""
    g = _gen(3)
    stored = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    ctx = type("Ctx", (), {"saved_tensors": (stored, torch.tensor(7)), "reduction": "mean",
                           "inplace": False})()
    grad = _fused()._KDLoss.backward(ctx, torch.tensor(1.0), None, None)[0]
    once = (stored.float() * (1.0 / 7)).to(torch.bfloat16)
    twice = stored * torch.tensor(1.0 / 7).to(torch.bfloat16)
    assert torch.equal(grad, once)
    assert not torch.equal(once, twice)  # the check can fail: the two roundings differ here

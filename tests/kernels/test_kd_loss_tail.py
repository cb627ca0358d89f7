"""The tail slot of a top-k teacher (``teacher_topk_tail``): the kernel against the reference,
and both against the dense loss where the tail makes the top-k loss exact.

On CPU the kernel runs in Triton's interpreter (see conftest.py): fp32, small shapes.
"""

import pytest
import torch
from kdscale.kernels import (
    kd_loss_reference,
    kd_loss_terms_reference,
    kd_loss_terms_triton,
    kd_loss_triton,
)

from tests.kernels.test_kd_loss import DEVICE, _gen, _labels, _logits, _tol

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
PATHS = {"kernel": kd_loss_triton, "reference": kd_loss_reference}


def _tail_teacher(t, k, temperature, n_pad=0):
    """The teacher's top k logits, their indices (the last n_pad slots padding) and the mass
    the full distribution at T puts outside the live slots: what a tail cache stores."""
    values, indices = t.topk(k, dim=-1)
    indices[:, k - n_pad:] = -1
    probs = torch.softmax(t.float() / temperature, dim=-1)
    kept = torch.where(indices >= 0, probs.gather(1, indices.clamp(min=0)), 0.0).sum(dim=-1)
    return dict(teacher_topk_values=values, teacher_topk_indices=indices,
                teacher_topk_tail=(1 - kept).clamp(min=0))


def _loss_and_grad(fn, student, **kw):
    s = student.detach().clone().requires_grad_()
    out = fn(s, **kw)
    (grad,) = torch.autograd.grad(out, s, torch.full_like(out, 1.5))
    return out, grad


@pytest.mark.parametrize("vocab, rows, k, n_pad, temperature, alpha, reduction", [
    (3, 17, 2, 0, 2.0, 0.5, "mean"),
    (1271, 6, 8, 2, 1.0, 1.0, "none"),
    (1271, 5, 130, 0, 4.0, 0.3, "sum"),  # k over one block of slots
])
def test_kernel_matches_reference(vocab, rows, k, n_pad, temperature, alpha, reduction):
    g = _gen(vocab + k)
    s, t = _logits((rows, vocab), g), _logits((rows, vocab), g)
    kw = dict(_tail_teacher(t, k, temperature, n_pad), labels=_labels(rows, vocab, g, 1),
              temperature=temperature, alpha=alpha, reduction=reduction)
    out, grad = _loss_and_grad(kd_loss_triton, s, **kw)
    want, grad_want = _loss_and_grad(kd_loss_reference, s, **kw)
    torch.testing.assert_close(out, want, **_tol(temperature))
    torch.testing.assert_close(grad, grad_want, **_tol(temperature))
    terms = kd_loss_terms_triton(s, **kw)
    terms_want = kd_loss_terms_reference(s, **kw)
    torch.testing.assert_close(terms.soft, terms_want.soft, **_tol(temperature))


@pytest.mark.parametrize("path", PATHS)
def test_the_tail_makes_top_k_exact_where_the_student_tail_follows_the_teacher(path):
    """Off the teacher's slots, a student whose logits are the teacher's plus a constant has
    q_j / q_tail = p_j / p_tail: then KL with the tail slot is the full KL, value and
    gradient, however the student differs on the slots; plain top-k is not."""
    g = _gen(7)
    t = _logits((6, 1271), g)
    values, indices = t.topk(16, dim=-1)
    s = (t + 0.7).scatter(1, indices, _logits((6, 16), g))  # own logits on the slots
    kw = dict(temperature=2.0, alpha=1.0)
    dense, grad_dense = _loss_and_grad(kd_loss_reference, s, teacher_logits=t, **kw)
    tail, grad_tail = _loss_and_grad(PATHS[path], s, **_tail_teacher(t, 16, 2.0), **kw)
    torch.testing.assert_close(tail, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_tail, grad_dense, rtol=1e-4, atol=1e-7)
    truncated, grad_truncated = _loss_and_grad(PATHS[path], s, teacher_topk_values=values,
                                               teacher_topk_indices=indices, **kw)
    assert (grad_truncated - grad_dense).abs().max() > 100 * (grad_tail - grad_dense).abs().max()


@pytest.mark.parametrize("path", PATHS)
def test_a_zero_tail_is_plain_top_k(path):
    g = _gen(3)
    s, t = _logits((5, 40), g), _logits((5, 40), g)
    values, indices = t.topk(6, dim=-1)
    kw = dict(teacher_topk_values=values, teacher_topk_indices=indices, temperature=2.0,
              alpha=1.0)
    plain, grad_plain = _loss_and_grad(PATHS[path], s, **kw)
    zero, grad_zero = _loss_and_grad(PATHS[path], s, teacher_topk_tail=torch.zeros(5), **kw)
    torch.testing.assert_close(zero, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_zero, grad_plain, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path", PATHS)
def test_a_student_with_no_mass_off_the_slots_stays_finite(path):
    """q_tail below fp32's resolution is floored, a constant: no inf, no NaN, and kernel and
    reference agree."""
    g = _gen(5)
    t = _logits((4, 300), g)
    kw = _tail_teacher(t, 8, 1.0)
    s = torch.full((4, 300), -60.0).scatter(1, kw["teacher_topk_indices"], 30.0).to(DEVICE)
    out, grad = _loss_and_grad(PATHS[path], s, temperature=1.0, alpha=1.0, **kw)
    want, grad_want = _loss_and_grad(kd_loss_reference, s, temperature=1.0, alpha=1.0, **kw)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(teacher_logits=True, teacher_topk_tail=torch.zeros(4)), "goes with a top-k"),
    (dict(teacher_topk_tail=torch.zeros(3)), "teacher_topk_tail shape"),
    (dict(teacher_topk_tail=torch.zeros(4, dtype=torch.long)), "floating tensor"),
    (dict(teacher_topk_tail=torch.zeros(4), inplace_grad=True), "inplace_grad cannot"),
])
def test_bad_tails_are_refused_by_name(kwargs, match):
    g = _gen(1)
    t = _logits((4, 10), g)
    s = (_logits((4, 10), g).requires_grad_() * 1.0)
    values, indices = t.topk(3, dim=-1)
    kw = dict(teacher_topk_values=values, teacher_topk_indices=indices, alpha=1.0)
    if kwargs.pop("teacher_logits", None):
        kw = dict(teacher_logits=t, alpha=1.0)
    with pytest.raises(ValueError, match=match):
        kd_loss_triton(s, **kw, **kwargs)

"""The Triton kernel (``kd_loss_triton``) against the reference: loss and gradient.

On CPU the kernel runs in Triton's interpreter (see conftest.py): fp32 and small shapes.
V = 1271 takes two blocks of the sweep over a row, V = 2 and 3 pack many rows to a program.
bf16/fp16, large shapes and torch.compile are in test_kd_loss_gpu.py.

Over 300 lines on purpose: the kernel's whole case table against the reference in one place.
"""

import importlib

import pytest
import torch
from kdscale.kernels import kd_loss, kd_loss_reference, kd_loss_triton

# Numpy, under the interpreter, warns on the inf - inf of masked lanes that where() then drops.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ["mean", "sum", "none"]


def _tol(temperature=1.0):
    # KL at high T is a small difference amplified by T^2: fp32 error grows with it.
    return dict(rtol=1e-5, atol=1e-6 * max(1.0, temperature**2))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, g, scale=2.0):
    return (scale * torch.randn(shape, generator=g)).to(DEVICE)


def _labels(n, vocab, g, n_ignored=0):
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return y.to(DEVICE)


def _topk(t, k, g, n_pad=0):
    """The k largest teacher logits per row in shuffled slot order, n_pad of them padding
    (index -1, junk values); (N, k) each."""
    values, indices = t.topk(k, dim=-1)
    order = torch.stack([torch.randperm(k, generator=g) for _ in range(t.shape[0])])
    values, indices = values.gather(1, order.to(DEVICE)), indices.gather(1, order.to(DEVICE))
    pad = torch.zeros_like(indices, dtype=torch.bool)
    pad[:, :n_pad] = True
    return values.masked_fill(pad, float("nan")), indices.masked_fill(pad, -1)


def _loss_and_grad(loss_fn, student, upstream, **kw):
    s = student.detach().clone().requires_grad_()
    out = loss_fn(s, **kw)
    if not isinstance(upstream, torch.Tensor):
        upstream = torch.full_like(out, upstream)
    (grad,) = torch.autograd.grad(out, s, upstream)
    return out, grad


def _compare(student, tol, seed=0, **kw):
    """Loss and gradient under a random upstream gradient (grad_output != 1), kernel vs
    reference; returns the kernel's."""
    expected = kd_loss_reference(student, **kw)
    upstream = (torch.randn(expected.shape, generator=_gen(seed)) + 2.0).to(DEVICE)
    out, grad = _loss_and_grad(kd_loss_triton, student, upstream, **kw)
    _, grad_expected = _loss_and_grad(kd_loss_reference, student, upstream, **kw)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, **tol)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(grad, grad_expected, **tol)
    return out, grad


# Every V, N, T, alpha, teacher and reduction appears; not their product (the interpreter is slow).
CASES = [  # vocab, rows, temperature, alpha, teacher, reduction
    (2, 41, 0.5, 0.5, "dense", "mean"),
    (2, 1, 20.0, 1.0, "topk", "none"),
    (2, 7, 1.0, 0.0, "dense", "none"),
    (3, 41, 4.0, 0.0, "dense", "sum"),
    (3, 7, 1.0, 0.5, "topk", "mean"),
    (3, 1, 0.5, 1.0, "dense", "sum"),
    (1000, 7, 20.0, 0.5, "dense", "none"),
    (1000, 1, 0.5, 1.0, "topk", "sum"),
    (1000, 7, 4.0, 0.5, "topk", "mean"),
    (1271, 7, 1.0, 1.0, "dense", "mean"),
    (1271, 1, 4.0, 0.5, "topk", "none"),
    (1271, 7, 20.0, 0.0, "topk", "sum"),
]


@pytest.mark.parametrize("vocab, rows, temperature, alpha, teacher, reduction", CASES)
def test_matches_reference(vocab, rows, temperature, alpha, teacher, reduction):
    g = _gen(vocab + rows)
    s, t = _logits((rows, vocab), g), _logits((rows, vocab), g)
    y = _labels(rows, vocab, g, n_ignored=rows // 4)
    kw = dict(labels=y, temperature=temperature, alpha=alpha, reduction=reduction)
    if teacher == "dense":
        kw["teacher_logits"] = t
    else:
        k = min(vocab, 8)
        values, indices = _topk(t, k, g, n_pad=k // 4)
        kw.update(teacher_topk_values=values, teacher_topk_indices=indices)
    _compare(s, _tol(temperature), seed=rows, **kw)


def test_tiles_cover_the_row_loop():
    """V = 1000 fits one block of the sweep over a row and V = 1271 takes two, so the cases
    above cover the online rescaling between blocks; V = 2 and 3 pack rows to a program."""
    module = importlib.import_module("kdscale.kernels.fused")
    assert 1000 <= module.BLOCK_V_MAX < 1271


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_every_row_ignored_gives_zero_without_nan(teacher, reduction):
    g = _gen(3)
    s = _logits((3, 5), g)
    s[0, 1], s[1, 2], s[2] = float("inf"), float("-inf"), float("nan")
    kw = dict(teacher_logits=_logits((3, 5), g))
    if teacher == "topk":
        kw = dict(teacher_topk_values=torch.full((3, 2), float("nan"), device=DEVICE),
                  teacher_topk_indices=torch.tensor([[0, 1], [-1, -1], [2, -1]], device=DEVICE))
    y = torch.full((3,), -100, device=DEVICE)
    out, grad = _loss_and_grad(kd_loss_triton, s, 1.0, labels=y, temperature=2.0,
                               reduction=reduction, **kw)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0)


def test_ignored_rows_with_inf_do_not_leak():
    g = _gen(4)
    s, t = _logits((4, 6), g), _logits((4, 6), g)
    y = torch.tensor([1, -100, 2, -100], device=DEVICE)
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[1], bad_t[1] = float("inf"), float("nan")
    bad_s[3, 0], bad_t[3, 0] = float("-inf"), float("inf")
    clean, g_clean = _loss_and_grad(kd_loss_triton, s, 1.0, teacher_logits=t, labels=y)
    dirty, g_dirty = _loss_and_grad(kd_loss_triton, bad_s, 1.0, teacher_logits=bad_t, labels=y)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)
    assert g_dirty[[1, 3]].eq(0).all()


@pytest.mark.parametrize("vocab, temperature", [(30, 0.5), (30, 4.0), (1271, 1.0)])
def test_teacher_with_minus_inf_logits(vocab, temperature):
    """p_t = 0 follows 0 * log 0 = 0; at V = 1271 a whole first block of the teacher is -inf."""
    g = _gen(18)
    s, t = _logits((4, vocab), g), _logits((4, vocab), g)
    t[:, : min(vocab - 20, 1024)] = float("-inf")
    t[0, -12:-10] = -1e30  # underflows to p_t = 0 without being -inf
    out, grad = _compare(s, _tol(temperature), teacher_logits=t, labels=_labels(4, vocab, g),
                         temperature=temperature, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_teacher_row_of_only_minus_inf_has_no_kl():
    """No teacher mass at all: KL = 0 and only the CE gradient (the reference's own autograd
    gives NaN there, through 0 * NaN in its where())."""
    g = _gen(24)
    s, t = _logits((3, 1271), g), _logits((3, 1271), g)
    t[1] = float("-inf")
    y = _labels(3, 1271, g)
    kw = dict(labels=y, temperature=2.0, reduction="none")
    out, grad = _loss_and_grad(kd_loss_triton, s, 1.0, teacher_logits=t, alpha=0.5, **kw)
    ce, ce_grad = _loss_and_grad(kd_loss_reference, s, 1.0, teacher_logits=t, alpha=0.0, **kw)
    torch.testing.assert_close(out, kd_loss_reference(s, t, alpha=0.5, **kw), **_tol(2.0))
    torch.testing.assert_close(out[1], 0.5 * ce[1], **_tol(2.0))
    torch.testing.assert_close(grad[1], 0.5 * ce_grad[1], **_tol(2.0))


@pytest.mark.parametrize("teacher", ["dense", "topk"])
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_huge_logits_stay_finite(temperature, teacher):
    g = _gen(5)
    sign = lambda: (torch.randint(0, 2, (4, 50), generator=g) * 2.0 - 1.0).to(DEVICE)  # noqa: E731
    s, t = 1e4 * sign(), 1e4 * sign()
    kw = dict(teacher_logits=t)
    if teacher == "topk":
        values, indices = _topk(t, 6, g, n_pad=1)
        kw = dict(teacher_topk_values=values, teacher_topk_indices=indices)
    out, grad = _compare(s, dict(rtol=1e-5, atol=1e-5), labels=_labels(4, 50, g),
                         temperature=temperature, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("vocab, temperature", [(2, 0.5), (2, 20.0), (1271, 1.0), (1271, 20.0)])
def test_teacher_equal_to_student_has_zero_loss_and_gradient(vocab, temperature):
    s = _logits((4, vocab), _gen(6))
    out, grad = _loss_and_grad(kd_loss_triton, s, 1.0, teacher_logits=s,
                               temperature=temperature, alpha=1.0)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6 * temperature**2)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0,
                               atol=1e-6 * max(1.0, temperature))


@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_non_contiguous_inputs(view):
    g = _gen(7)
    if view == "transposed":
        s, t = _logits((9, 5), g).t(), _logits((9, 5), g).t()  # (N, V) = (5, 9)
    else:
        s, t = _logits((5, 18), g)[:, ::2], _logits((5, 18), g)[:, 1::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    _compare(s, _tol(2.0), teacher_logits=t, labels=_labels(5, 9, g, 1), temperature=2.0)
    values, indices = _topk(t.contiguous(), 4, g, n_pad=1)
    _compare(s, _tol(2.0), teacher_topk_values=values.t().contiguous().t(),
             teacher_topk_indices=indices, labels=_labels(5, 9, g, 1), temperature=2.0)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_topk_with_k_equal_v_matches_dense(index_dtype):
    """k = V = 300 also takes three blocks of slots."""
    g = _gen(10)
    s, t = _logits((3, 300), g), _logits((3, 300), g)
    y = _labels(3, 300, g)
    values, indices = _topk(t, 300, g)
    kw = dict(labels=y, temperature=3.0, reduction="none")
    upstream = torch.randn(3, generator=g).to(DEVICE) + 2.0
    dense, grad_dense = _loss_and_grad(kd_loss_triton, s, upstream, teacher_logits=t, **kw)
    topk, grad_topk = _loss_and_grad(kd_loss_triton, s, upstream, teacher_topk_values=values,
                                     teacher_topk_indices=indices.to(index_dtype), **kw)
    torch.testing.assert_close(topk, dense, **_tol(3.0))
    torch.testing.assert_close(grad_topk, grad_dense, **_tol(3.0))


def test_topk_rows_of_only_padding_have_no_kl():
    g = _gen(12)
    s = _logits((3, 9), g)
    values = torch.randn(3, 3, generator=g).to(DEVICE)
    indices = torch.tensor([[4, 0, 7], [-1, -1, -1], [-1, 2, -1]], device=DEVICE)
    y = torch.tensor([1, 2, -100], device=DEVICE)
    out, grad = _compare(s, _tol(), teacher_topk_values=values, teacher_topk_indices=indices,
                         labels=y, alpha=0.5, reduction="none")
    assert out[0] > 0 and out[2] == 0 and torch.isfinite(grad).all()
    soft, soft_grad = _loss_and_grad(kd_loss_triton, s, 1.0, teacher_topk_values=values,
                                     teacher_topk_indices=indices, alpha=1.0, reduction="none")
    assert soft[1] == 0 and soft_grad[1].eq(0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_inplace_grad_gives_the_same_gradient(teacher, reduction):
    g = _gen(19)
    base = _logits((2, 3, 1271), g)  # (B, S, V)
    t = _logits((2, 3, 1271), g)
    kw = dict(labels=_labels(6, 1271, g, 1).view(2, 3), temperature=2.0, reduction=reduction)
    if teacher == "dense":
        kw["teacher_logits"] = t
    else:
        values, indices = _topk(t.view(6, -1), 16, g, n_pad=3)
        kw.update(teacher_topk_values=values, teacher_topk_indices=indices)
    upstream = (torch.randn((2, 3) if reduction == "none" else (), generator=g) + 2).to(DEVICE)
    out, grad = _loss_and_grad(kd_loss_triton, base, upstream, **kw)
    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate, as a model's logits are
    out_inplace = kd_loss_triton(logits, inplace_grad=True, **kw)
    out_inplace.backward(upstream)
    torch.testing.assert_close(out_inplace, out, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), grad, rtol=0, atol=0)  # overwritten


def test_inplace_grad_refuses_a_leaf():
    s = _logits((2, 5), _gen(25)).requires_grad_()
    with pytest.raises(ValueError, match="inplace_grad .* leaf"):
        kd_loss_triton(s, s.detach(), inplace_grad=True, alpha=1.0)


def test_backward_twice_gives_the_same_gradient():
    """The saved gradient is scaled out of place: retain_graph works."""
    g = _gen(20)
    s = _logits((5, 40), g).requires_grad_()
    out = kd_loss_triton(s, _logits((5, 40), g), _labels(5, 40, g, 1), temperature=2.0)
    (first,) = torch.autograd.grad(out, s, torch.tensor(3.0), retain_graph=True)
    (second,) = torch.autograd.grad(out, s, torch.tensor(3.0))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_without_grad_the_loss_is_the_same(teacher):
    """No gradient is written when none is needed; the loss does not change."""
    g = _gen(21)
    s, t = _logits((7, 1271), g), _logits((7, 1271), g)
    kw = dict(teacher_logits=t)
    if teacher == "topk":
        values, indices = _topk(t, 8, g, n_pad=2)
        kw = dict(teacher_topk_values=values, teacher_topk_indices=indices)
    kw.update(labels=_labels(7, 1271, g, 2), temperature=2.0, reduction="none")
    with torch.no_grad():
        loss_only = kd_loss_triton(s.clone().requires_grad_(), **kw)
    with_grad = kd_loss_triton(s.clone().requires_grad_(), **kw)
    torch.testing.assert_close(loss_only, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(loss_only, kd_loss_reference(s, **kw), **_tol(2.0))


def test_3d_mean_divides_by_valid_tokens_and_int32_labels():
    g = _gen(8)
    s, t = _logits((2, 5, 11), g), _logits((2, 5, 11), g)  # (B, S, V)
    y = _labels(10, 11, g, n_ignored=6).view(2, 5).to(torch.int32)  # 4 valid tokens
    mean, _ = _compare(s, _tol(2.0), teacher_logits=t, labels=y, temperature=2.0)
    rows = kd_loss_triton(s, t, y, temperature=2.0, reduction="none")
    assert rows.shape == (2, 5) and rows[y == -100].eq(0).all()
    torch.testing.assert_close(mean, rows.sum() / 4)


def test_without_labels_only_the_soft_term_counts():
    g = _gen(15)
    s, t = _logits((2, 3, 8), g), _logits((2, 3, 8), g)
    values, indices = _topk(t.view(6, 8), 3, g)
    _compare(s, _tol(2.0), teacher_logits=t, temperature=2.0, alpha=1.0)
    _compare(s, _tol(2.0), teacher_topk_values=values.view(2, 3, 3),
             teacher_topk_indices=indices.view(2, 3, 3), temperature=2.0, alpha=1.0)


def test_label_or_index_out_of_range_gives_nan():
    """The kernel cannot raise: an out-of-range label or top-k index makes that row NaN."""
    g = _gen(22)
    s, t = _logits((3, 10), g), _logits((3, 10), g)
    y = torch.tensor([1, 10, 2], device=DEVICE)
    rows = kd_loss_triton(s, t, y, reduction="none")
    assert rows[1].isnan() and rows[[0, 2]].isfinite().all()
    indices = torch.tensor([[0, 1], [2, 3], [4, 12]], device=DEVICE)
    rows = kd_loss_triton(s, teacher_topk_values=t[:, :2], teacher_topk_indices=indices,
                          alpha=1.0, reduction="none")
    assert rows[2].isnan() and rows[:2].isfinite().all()


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_gradient_formula_matches_autograd(teacher):
    """The formula the kernel writes, in plain torch, against autograd of the reference:
    alpha * T * (q_T * P - p_t) + (1 - alpha) * (q - onehot(y)), over the valid rows."""
    g = _gen(23)
    n, vocab, k, temperature, alpha = 6, 20, 5, 3.0, 0.3
    s, t = _logits((n, vocab), g).cpu(), _logits((n, vocab), g).cpu()
    y = _labels(n, vocab, g, n_ignored=2).cpu()
    p_t = torch.softmax(t / temperature, -1)
    kw = dict(teacher_logits=t)
    if teacher == "topk":
        values, indices = _topk(t, k, g, n_pad=1)
        values, indices = values.cpu(), indices.cpu()
        live = indices >= 0
        p_slots = torch.softmax(values.masked_fill(~live, float("-inf")) / temperature, -1)
        p_t = torch.zeros_like(s).scatter_add(1, indices.clamp(min=0), p_slots * live)
        kw = dict(teacher_topk_values=values, teacher_topk_indices=indices)
    valid = (y != -100)[:, None]
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), vocab)
    q_t, q = torch.softmax(s / temperature, -1), torch.softmax(s, -1)
    formula = alpha * temperature * (q_t - p_t) + (1 - alpha) * (q - onehot)
    formula = torch.where(valid, formula, 0.0) / valid.sum()
    _, grad = _loss_and_grad(kd_loss_reference, s, 1.0, labels=y, temperature=temperature,
                             alpha=alpha, **kw)
    torch.testing.assert_close(grad, formula, **_tol(temperature))


_S, _T, _Y = torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one teacher"),
    (dict(teacher_logits=torch.zeros(4, 6)), r"\(4, 6\) does not match .*\(4, 5\)"),
    (dict(teacher_topk_values=torch.zeros(4, 2)), "needs both"),
    (dict(teacher_logits=_T, alpha=0.5), "without labels .* alpha must be 1"),
    (dict(teacher_logits=_T, labels=_Y, temperature=0.0), "temperature must be > 0"),
    (dict(teacher_logits=_T, labels=_Y, reduction="batchmean"), "reduction must be one of"),
    (dict(teacher_logits=torch.zeros(4, 5, device="meta"), labels=_Y), "is on meta"),
])
def test_validation_errors_are_the_reference_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_loss_triton(_S, **kwargs)
    if "device" not in str(kwargs):
        with pytest.raises(ValueError, match=match):
            kd_loss_reference(_S, **kwargs)


def test_public_kd_loss_is_the_reference_off_cuda():
    g = _gen(17)
    s, t = _logits((4, 12), g).cpu(), _logits((4, 12), g).cpu()
    y = _labels(4, 12, g).cpu()
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0),
                               kd_loss_reference(s, t, y, temperature=2.0), rtol=0, atol=0)

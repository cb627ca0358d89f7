"""The reference loss against an independent build from F.kl_div and F.cross_entropy.

Over 300 lines on purpose: every ugly case of the contract (V, N, T, reductions, ignored
rows, top-k padding) for the one definition every other path is tested against.
"""

import pytest
import torch
import torch.nn.functional as F
from kdscale.kernels import kd_loss, kd_loss_reference

# The loss is always computed in fp32; gradients come back in the input dtype, so low-precision
# inputs get looser tolerances. The oracle runs in fp64 on the same (rounded) inputs.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
}
DTYPES = list(TOL)
REDUCTIONS = ["mean", "sum", "none"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, g, dtype=torch.float32, scale=2.0):
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def _labels(shape, vocab, g, n_ignored=1, ignore_index=-100):
    y = torch.randint(0, vocab, shape, generator=g)  # shape = leading dims
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = ignore_index
    return y


def torch_kd_loss(student, teacher, labels, temperature=1.0, alpha=0.5, ignore_index=-100,
                  reduction="mean"):
    """The loss contract, built in fp64 from torch.nn.functional, independently of kdscale."""
    lead, vocab = student.shape[:-1], student.shape[-1]
    s = student.reshape(-1, vocab).double()  # (N, V)
    t = teacher.detach().reshape(-1, vocab).double()  # (N, V)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                  reduction="none", log_target=False).sum(-1)  # (N,)
    rows = alpha * temperature**2 * kl
    valid = torch.ones_like(rows, dtype=torch.bool)
    if labels is not None:
        y = labels.reshape(-1)
        valid = y != ignore_index
        ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
        rows = (rows + (1 - alpha) * ce) * valid
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


def _compare(student, teacher, labels, tol, seed=0, **kw):
    """Loss and gradient (under a random upstream gradient) of the reference vs the oracle."""
    s_ref = student.detach().clone().requires_grad_()
    s_exp = student.detach().clone().requires_grad_()
    out = kd_loss_reference(s_ref, teacher, labels, **kw)
    expected = torch_kd_loss(s_exp, teacher, labels, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), **tol)
    upstream = torch.randn(out.shape, generator=_gen(seed)) + 2.0  # grad_output != 1
    (grad,) = torch.autograd.grad(out, s_ref, upstream)
    (grad_exp,) = torch.autograd.grad(expected, s_exp, upstream.double())
    assert grad.dtype == student.dtype
    torch.testing.assert_close(grad, grad_exp, **tol)
    return out, grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("vocab", [2, 3, 30522])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch(dtype, vocab, reduction):
    g = _gen(vocab)
    s, t = _logits((4, vocab), g, dtype), _logits((4, vocab), g, dtype)
    y = _labels((4,), vocab, g)
    _compare(s, t, y, TOL[dtype], temperature=2.0, alpha=0.5, reduction=reduction)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_temperatures(temperature, alpha):
    g = _gen(1)
    s, t = _logits((8, 100), g), _logits((8, 100), g)
    y = _labels((8,), 100, g, n_ignored=2)
    # KL at high T is a small difference amplified by T^2: fp32 error grows with it.
    tol = dict(rtol=1e-5, atol=1e-6 * max(1.0, temperature**2))
    _compare(s, t, y, tol, temperature=temperature, alpha=alpha, reduction="sum")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_row(reduction):
    g = _gen(2)
    s, t = _logits((1, 7), g), _logits((1, 7), g)
    y = torch.tensor([3])
    out, _ = _compare(s, t, y, TOL[torch.float32], temperature=3.0, reduction=reduction)
    assert out.shape == ((1,) if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("topk", [False, True])
def test_every_row_ignored_gives_zero_without_nan(reduction, topk):
    g = _gen(3)
    s = _logits((3, 5), g)
    s[0, 1], s[1, 2], s[2] = float("inf"), float("-inf"), float("nan")
    s.requires_grad_()
    teacher = dict(teacher_logits=_logits((3, 5), g))
    if topk:
        teacher = dict(teacher_topk_values=torch.full((3, 2), float("nan")),
                       teacher_topk_indices=torch.tensor([[0, 1], [-1, -1], [2, -1]]))
    y = torch.full((3,), -100)
    out = kd_loss_reference(s, labels=y, reduction=reduction, temperature=2.0, **teacher)
    (grad,) = torch.autograd.grad(out.sum(), s)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_ignored_rows_with_inf_do_not_leak():
    g = _gen(4)
    s, t = _logits((4, 6), g), _logits((4, 6), g)
    y = torch.tensor([1, -100, 2, -100])
    bad_s, bad_t = s.clone(), t.clone()
    bad_s[1], bad_t[1] = float("inf"), float("nan")
    bad_s[3, 0], bad_t[3, 0] = float("-inf"), float("inf")
    s.requires_grad_(), bad_s.requires_grad_()
    clean = kd_loss_reference(s, t, y, temperature=2.0)
    (g_clean,) = torch.autograd.grad(clean, s)
    with torch.autograd.detect_anomaly(check_nan=True):  # no NaN anywhere in the backward
        dirty = kd_loss_reference(bad_s, bad_t, y, temperature=2.0)
        (g_dirty,) = torch.autograd.grad(dirty, bad_s)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)
    assert g_dirty[[1, 3]].eq(0).all()


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_teacher_with_minus_inf_logits(temperature):
    """Teacher probabilities of exactly 0 (masked outputs, underflow) follow 0 * log 0 = 0."""
    g = _gen(18)
    s, t = _logits((4, 30), g), _logits((4, 30), g)
    t[:, :10] = float("-inf")
    t[0, 10:12] = -1e30  # underflows to p_t = 0 without being -inf
    y = _labels((4,), 30, g)
    with torch.autograd.detect_anomaly(check_nan=True):
        out, grad = _compare(s, t, y, TOL[torch.float32], temperature=temperature,
                             reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_huge_logits_stay_finite(temperature):
    g = _gen(5)
    sign = lambda: torch.randint(0, 2, (4, 50), generator=g) * 2.0 - 1.0  # noqa: E731
    s, t = 1e4 * sign(), 1e4 * sign()
    y = _labels((4,), 50, g)
    out, grad = _compare(s, t, y, dict(rtol=1e-5, atol=1e-5), temperature=temperature)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("vocab", [2, 30522])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_teacher_equal_to_student_has_zero_kl(temperature, vocab):
    s = _logits((4, vocab), _gen(6)).requires_grad_()
    out = kd_loss_reference(s, s, temperature=temperature, alpha=1.0)
    (grad,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(out, torch.tensor(0.0), rtol=0, atol=1e-6 * temperature**2)
    torch.testing.assert_close(grad, torch.zeros_like(grad),
                               rtol=0, atol=1e-6 * max(1.0, temperature))


@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_non_contiguous_inputs(view):
    g = _gen(7)
    if view == "transposed":
        base_s, base_t = _logits((9, 5), g), _logits((9, 5), g)  # (V, N)
        s, t = base_s.t(), base_t.t()  # (N, V)
    else:
        base_s, base_t = _logits((5, 18), g), _logits((5, 18), g)
        s, t = base_s[:, ::2], base_t[:, 1::2]  # (N, V)
    assert not s.is_contiguous() and not t.is_contiguous()
    y = _labels((5,), 9, g)
    _compare(s, t, y, TOL[torch.float32], temperature=2.0)
    s_c = s.contiguous().requires_grad_()
    base_s.requires_grad_()
    view_s = base_s.t() if view == "transposed" else base_s[:, ::2]
    out_view = kd_loss_reference(view_s, t, y, temperature=2.0)
    out_contig = kd_loss_reference(s_c, t.contiguous(), y, temperature=2.0)
    torch.testing.assert_close(out_view, out_contig, rtol=0, atol=0)
    (g_base,) = torch.autograd.grad(out_view, base_s)
    (g_contig,) = torch.autograd.grad(out_contig, s_c)
    g_view = g_base.t() if view == "transposed" else g_base[:, ::2]
    torch.testing.assert_close(g_view, g_contig, rtol=0, atol=0)


def test_3d_mean_divides_by_valid_tokens():
    g = _gen(8)
    s, t = _logits((2, 5, 11), g), _logits((2, 5, 11), g)  # (B, S, V)
    y = _labels((2, 5), 11, g, n_ignored=6)  # 4 valid tokens
    mean, _ = _compare(s, t, y, TOL[torch.float32], temperature=2.0)
    rows = kd_loss_reference(s, t, y, temperature=2.0, reduction="none")  # (B, S)
    assert rows.shape == (2, 5)
    assert rows[y == -100].eq(0).all() and rows[y != -100].ne(0).all()
    torch.testing.assert_close(mean, rows.sum() / 4)
    assert not torch.isclose(mean, rows.sum() / 2)  # not "batchmean" over B


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_temperature_squared_scaling(temperature):
    g = _gen(9)
    s, t = _logits((6, 13), g), _logits((6, 13), g)
    out = kd_loss_reference(s, t, temperature=temperature, alpha=1.0)
    kl = F.kl_div(F.log_softmax(s.double() / temperature, -1),
                  F.softmax(t.double() / temperature, -1), reduction="batchmean")
    torch.testing.assert_close(out, (temperature**2 * kl).float(),
                               rtol=1e-5, atol=1e-6 * temperature**2)


def _permutation_topk(t, g):
    """All V teacher logits as a top-k cache in shuffled slot order; (N, V) each."""
    perm = torch.stack([torch.randperm(t.shape[-1], generator=g) for _ in range(t.shape[0])])
    return t.gather(1, perm), perm


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_topk_with_k_equal_v_matches_dense(reduction, index_dtype):
    g = _gen(10)
    s, t = _logits((5, 17), g).requires_grad_(), _logits((5, 17), g)
    y = _labels((5,), 17, g)
    values, indices = _permutation_topk(t, g)
    kw = dict(temperature=3.0, reduction=reduction)
    dense = kd_loss_reference(s, t, y, **kw)
    topk = kd_loss_reference(s, labels=y, teacher_topk_values=values,
                             teacher_topk_indices=indices.to(index_dtype), **kw)
    torch.testing.assert_close(topk, dense)
    upstream = torch.randn(dense.shape, generator=g) + 2.0
    (grad_dense,) = torch.autograd.grad(dense, s, upstream)
    (grad_topk,) = torch.autograd.grad(topk, s, upstream)
    torch.testing.assert_close(grad_topk, grad_dense)


def test_topk_padding_slots_are_ignored():
    g = _gen(11)
    n, vocab, k, n_pad = 6, 40, 8, 3
    s = _logits((n, vocab), g).requires_grad_()
    t = _logits((n, vocab), g)
    y = _labels((n,), vocab, g)
    indices = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])  # (N, k)
    values = t.gather(1, indices)  # (N, k)
    pad = torch.zeros(n, k, dtype=torch.bool)
    for r in range(n):
        pad[r, torch.randperm(k, generator=g)[:n_pad]] = True
    padded_idx = indices.masked_fill(pad, -1)
    padded_val = values.masked_fill(pad, float("nan")).masked_fill(pad & (indices % 2 == 0), 1e30)
    kw = dict(labels=y, temperature=2.0, reduction="none")
    out = kd_loss_reference(s, teacher_topk_values=padded_val,
                            teacher_topk_indices=padded_idx, **kw)
    keep = (n, k - n_pad)
    trimmed = kd_loss_reference(s, teacher_topk_values=values[~pad].view(keep),
                                teacher_topk_indices=indices[~pad].view(keep), **kw)
    torch.testing.assert_close(out, trimmed)
    # A top-k teacher is the dense teacher with -inf outside its kept slots.
    t_dense = torch.full_like(t, float("-inf")).scatter(1, indices[~pad].view(keep),
                                                        values[~pad].view(keep))
    upstream = torch.randn(n, generator=g) + 2.0
    (grad,) = torch.autograd.grad(out, s, upstream)
    (grad_trimmed,) = torch.autograd.grad(trimmed, s, upstream)
    s_exp = s.detach().clone().requires_grad_()
    expected = torch_kd_loss(s_exp, t_dense, y, temperature=2.0, reduction="none")
    (grad_exp,) = torch.autograd.grad(expected, s_exp, upstream.double())
    torch.testing.assert_close(out, expected.float(), **TOL[torch.float32])
    torch.testing.assert_close(grad, grad_trimmed)
    torch.testing.assert_close(grad, grad_exp.float(), **TOL[torch.float32])


def test_topk_row_of_only_padding_has_no_kl():
    g = _gen(12)
    s = _logits((2, 9), g).requires_grad_()
    values = torch.randn(2, 3, generator=g)
    indices = torch.tensor([[4, 0, 7], [-1, -1, -1]])
    out = kd_loss_reference(s, teacher_topk_values=values, teacher_topk_indices=indices,
                            alpha=1.0, reduction="none")
    (grad,) = torch.autograd.grad(out.sum(), s)
    assert out[0] > 0 and out[1] == 0
    assert torch.isfinite(grad).all() and grad[1].eq(0).all()


def test_topk_with_3d_inputs_matches_dense():
    g = _gen(13)
    s, t = _logits((2, 3, 6), g), _logits((2, 3, 6), g)  # (B, S, V)
    y = _labels((2, 3), 6, g, n_ignored=2)
    values, indices = _permutation_topk(t.view(6, 6), g)
    dense = kd_loss_reference(s, t, y, temperature=2.0)
    for v, i in [(values.view(2, 3, 6), indices.view(2, 3, 6)), (values, indices)]:
        topk = kd_loss_reference(s, labels=y, teacher_topk_values=v, teacher_topk_indices=i,
                                 temperature=2.0)
        torch.testing.assert_close(topk, dense)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_reductions_are_consistent(ignore_index):
    g = _gen(14)
    s, t = _logits((3, 4, 10), g), _logits((3, 4, 10), g)
    y = _labels((3, 4), 10, g, n_ignored=5, ignore_index=ignore_index)
    n_valid = (y != ignore_index).sum()
    kw = dict(temperature=1.5, alpha=0.7, ignore_index=ignore_index)
    rows = kd_loss_reference(s, t, y, reduction="none", **kw)
    total = kd_loss_reference(s, t, y, reduction="sum", **kw)
    mean = kd_loss_reference(s, t, y, reduction="mean", **kw)
    assert rows.shape == (3, 4) and rows[y == ignore_index].eq(0).all()
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, total / n_valid)
    _compare(s, t, y, TOL[torch.float32], reduction="none", **kw)


def test_without_labels_only_the_soft_term_counts():
    g = _gen(15)
    s, t = _logits((2, 3, 8), g), _logits((2, 3, 8), g)
    out, _ = _compare(s, t, None, TOL[torch.float32], temperature=2.0, alpha=1.0)
    y = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(out, kd_loss_reference(s, t, y, temperature=2.0, alpha=1.0))


def test_bf16_in_fp32_out_and_teacher_gets_no_gradient():
    g = _gen(16)
    s = _logits((4, 12), g, torch.bfloat16).requires_grad_()
    t = _logits((4, 12), g, torch.bfloat16).requires_grad_()
    out = kd_loss_reference(s, t, _labels((4,), 12, g), temperature=2.0)
    grad_s, grad_t = torch.autograd.grad(out, [s, t], allow_unused=True)
    assert out.dtype == torch.float32 and grad_s.dtype == torch.bfloat16
    assert grad_t is None


def test_public_kd_loss_is_the_reference_off_cuda():
    g = _gen(17)
    s, t = _logits((4, 12), g), _logits((4, 12), g)
    y = _labels((4,), 12, g)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=0.2),
                               kd_loss_reference(s, t, y, temperature=2.0, alpha=0.2),
                               rtol=0, atol=0)


_S, _T, _Y = torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)
_V, _I = torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one teacher"),
    (dict(teacher_logits=_T, teacher_topk_values=_V, teacher_topk_indices=_I),
     "exactly one teacher"),
    (dict(teacher_topk_values=_V), "needs both"),
    (dict(teacher_logits=torch.zeros(4, 6)), r"\(4, 6\) does not match .*\(4, 5\)"),
    (dict(teacher_topk_values=_V, teacher_topk_indices=torch.zeros(4, 3, dtype=torch.long)),
     r"\(4, 2\) does not match .*\(4, 3\)"),
    (dict(teacher_topk_values=torch.zeros(3, 2), teacher_topk_indices=_I[:3]),
     r"\(3, 2\) does not match the rows"),
    (dict(teacher_topk_values=_V, teacher_topk_indices=_V), "must be an integer"),
    (dict(teacher_logits=_T, labels=torch.zeros(5, dtype=torch.long)),
     r"labels shape \(5,\) does not match"),
    (dict(teacher_logits=_T, labels=_Y.float()), "labels must be an integer"),
    (dict(teacher_logits=_T, labels=_Y, temperature=0.0), "temperature must be > 0"),
    (dict(teacher_logits=_T, labels=_Y, temperature=-1.0), "temperature must be > 0"),
    (dict(teacher_logits=_T, labels=_Y, alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(teacher_logits=_T, labels=_Y, alpha=-0.1), r"alpha must be in \[0, 1\]"),
    (dict(teacher_logits=_T, alpha=0.5), "without labels .* alpha must be 1"),
    (dict(teacher_logits=_T, labels=_Y, reduction="batchmean"), "reduction must be one of"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kd_loss_reference(_S, **kwargs)

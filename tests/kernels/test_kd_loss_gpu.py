"""The Triton kernel on a GPU: half precision, large shapes, torch.compile, in-place gradient.

Run with ``pytest -m gpu tests/kernels`` (``launch/gpu_check.sh`` runs the whole folder on the
GPU, where the CPU-sized tests of test_kd_loss.py run on CUDA too); skipped without CUDA.
The reference runs in fp32 on the same (rounded) inputs.
"""

import pytest
import torch
from kdscale.kernels import (
    kd_loss,
    kd_loss_reference,
    kd_loss_terms,
    kd_loss_terms_reference,
    kd_loss_triton,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Per quantity and dtype. Losses are fp32 whatever the input dtype (the reference runs in
# fp32 on the same rounded inputs): they differ by summation order alone. Gradients come
# back in the input dtype, rounded when the kernel stores them and again after the fp32
# scaling by grad_output: two roundings at most, so two units in the last place.
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=2 * 2**-7, atol=1e-6),
    torch.float16: dict(rtol=2 * 2**-10, atol=1e-6),
}


def _inputs(rows, vocab, dtype, seed=0, n_ignored=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (2 * torch.randn(rows, vocab, generator=g, device="cuda")).to(dtype)
    t = (2 * torch.randn(rows, vocab, generator=g, device="cuda")).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    y[torch.randperm(rows, generator=g, device="cuda")[:n_ignored]] = -100
    return s, t, y


def _loss_and_grad(fn, student, upstream=None, **kw):
    s = student.detach().clone().requires_grad_()
    out = fn(s, **kw)
    upstream = torch.full_like(out, 1.5) if upstream is None else upstream
    (grad,) = torch.autograd.grad(out, s, upstream)
    return out, grad


def _compare(student, **kw):
    out, grad = _loss_and_grad(kd_loss_triton, student, **kw)
    expected, grad_expected = _loss_and_grad(kd_loss_reference, student, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **LOSS_TOL)
    assert grad.dtype == student.dtype
    torch.testing.assert_close(grad, grad_expected, **GRAD_TOL[student.dtype])


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=str)
@pytest.mark.parametrize("vocab", [2, 3, 1271, 30522])
@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_matches_reference(teacher, vocab, dtype):
    s, t, y = _inputs(64, vocab, dtype)
    kw = dict(labels=y, temperature=2.0, alpha=0.5, reduction="none")
    if teacher == "dense":
        kw["teacher_logits"] = t
    else:
        values, indices = t.topk(min(vocab, 64), dim=-1)
        indices[:, -3:] = -1
        kw.update(teacher_topk_values=values, teacher_topk_indices=indices)
    _compare(s, **kw)


@pytest.mark.parametrize("rows, vocab", [(8192, 30522), (512, 128256)])
def test_large_shapes_in_bf16(rows, vocab):
    s, t, y = _inputs(rows, vocab, torch.bfloat16, n_ignored=rows // 10)
    _compare(s, teacher_logits=t, labels=y, temperature=4.0,
             reduction="none")  # per-row gradients of order 1, not divided by N


def test_row_offsets_beyond_2_to_the_31():
    """N * V > 2^31: the last rows sit past any int32 offset; checked against the reference."""
    rows, vocab = 16800, 128256  # 2.15e9 elements, bf16: 4.3 GB per tensor
    s, t, y = _inputs(rows, vocab, torch.bfloat16, n_ignored=0)
    out, grad = _loss_and_grad(kd_loss_triton, s, teacher_logits=t, labels=y, reduction="none")
    tail = slice(rows - 32, rows)
    expected, grad_expected = _loss_and_grad(kd_loss_reference, s[tail], teacher_logits=t[tail],
                                             labels=y[tail], reduction="none")
    torch.testing.assert_close(out[tail], expected, **LOSS_TOL)
    torch.testing.assert_close(grad[tail], grad_expected.to(grad.dtype),
                               **GRAD_TOL[torch.bfloat16])


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_torch_compile_fullgraph(teacher):
    s, t, y = _inputs(256, 30522, torch.bfloat16)
    kw = dict(teacher_logits=t)
    if teacher == "topk":
        values, indices = t.topk(32, dim=-1)
        kw = dict(teacher_topk_values=values, teacher_topk_indices=indices)

    def step(student):  # a loss inside a compiled training step
        return kd_loss(student * 1.0, labels=y, temperature=2.0, alpha=0.5, **kw)

    compiled = torch.compile(step, fullgraph=True)
    out, grad = _loss_and_grad(compiled, s)
    expected, grad_expected = _loss_and_grad(step, s)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-2, atol=1e-7)  # mean: tiny grads


def _peak_extra_bytes(student, inplace_grad, **kw):
    """Loss and leaf gradient of (student * 1.0), a model's logits; the peak memory above
    what was allocated before."""
    leaf = student.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kd_loss_triton(leaf * 1.0, inplace_grad=inplace_grad, **kw).backward(torch.tensor(1.5))
    return leaf.grad, torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_inplace_grad_saves_memory_and_matches(teacher):
    s, t, y = _inputs(4096, 30522, torch.bfloat16)
    kw = dict(labels=y, teacher_logits=t)
    if teacher == "topk":
        values, indices = t.topk(64, dim=-1)
        kw = dict(labels=y, teacher_topk_values=values, teacher_topk_indices=indices)
    grad, extra = _peak_extra_bytes(s, False, **kw)
    grad_inplace, extra_inplace = _peak_extra_bytes(s, True, **kw)
    torch.testing.assert_close(grad_inplace, grad, rtol=0, atol=0)
    logits_bytes = s.numel() * s.element_size()
    assert extra_inplace < extra - 1.5 * logits_bytes  # neither the gradient nor its scaled copy


def test_public_kd_loss_takes_the_kernel_on_cuda():
    s, t, y = _inputs(32, 100, torch.float32)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=3.0),
                               kd_loss_triton(s, t, y, temperature=3.0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_training_call_matches_the_reference_terms(dtype):
    """kd_loss_terms, as KDLoss.parts calls it: soft-only rows, the sum reduction."""
    s, t, y = _inputs(512, 30522, dtype)
    y[:64] = -1  # copies labelled by the teacher alone
    kw = dict(teacher_logits=t, labels=y, temperature=2.0, alpha=0.5, soft_only_index=-1,
              reduction="sum")
    leaf = s.detach().clone().requires_grad_()
    got = kd_loss_terms(leaf, **kw)
    (grad,) = torch.autograd.grad(got.loss, leaf)
    leaf_ref = s.detach().clone().requires_grad_()
    want = kd_loss_terms_reference(leaf_ref, **kw)
    (grad_want,) = torch.autograd.grad(want.loss, leaf_ref)
    for name in ("loss", "soft", "hard"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **LOSS_TOL)
    torch.testing.assert_close(grad, grad_want.to(dtype), **GRAD_TOL[dtype])


def test_a_top_k_teacher_with_a_tail_slot_in_bf16():
    s, t, y = _inputs(256, 30522, torch.bfloat16)
    values, indices = t.topk(64, dim=-1)
    probs = torch.softmax(t.float() / 2.0, dim=-1)
    tail = 1 - probs.gather(1, indices).sum(dim=-1)
    _compare(s, teacher_topk_values=values, teacher_topk_indices=indices,
             teacher_topk_tail=tail, labels=y, temperature=2.0, reduction="none")

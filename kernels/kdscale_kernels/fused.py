"""The distillation loss of ``reference.py`` as one fused Triton kernel: loss and gradient.

Per row (z_s the student logits, z_t the teacher's, y the label, T the temperature)::

    log q_T = log_softmax(z_s / T)    log q = log_softmax(z_s)    p_t = softmax(z_t / T)
    loss    = alpha * T^2 * sum_v p_t (log p_t - log q_T)  +  (1 - alpha) * (-log q[y])

Gradient w.r.t. z_s. With d log q_T[v] / d z_s[j] = (delta_vj - q_T[j]) / T::

    d/dz_s[j] of alpha * T^2 * KL  = alpha * T * (q_T[j] * P - p_t[j]),   P = sum_v p_t[v] = 1
    d/dz_s[j] of (1 - alpha) * CE  = (1 - alpha) * (q[j] - [j == y])

Top-k teacher (k slots of values and indices, index -1 = padding): p_t is the softmax of the
values over the live slots and KL sums over the slots, so P = sum of p_t over the live slots
(1, or 0 for a row of padding only) and p_t[j] is the mass of the slot holding index j. The
student's log-sum-exps still cover the whole row.

Top-k with a tail slot (tail = the teacher's mass off its k slots; q_tail = 1 - sum over the
slots of q_T, floored as in ``reference.py``): the slots hold p_t = (1 - tail) * softmax of the
values, KL gains tail * (log tail - log q_tail), and with r = tail / q_tail::

    d/dz_s[j] of alpha * T^2 * KL = alpha * T * (q_T[j] * (P + tail) - p_t[j] - r * q_T[j]),
                                    the last term only where j is not a slot

Pass 2 writes the r term at every column; the scatter takes it back at the slots.

A row labelled ``soft_only_index`` (a copy labelled by the teacher alone) has the soft term and
not the hard one. Training takes one launch for the loss and both terms: the kernel writes each
row's soft term (T^2 * KL) and hard term (CE) beside the loss, for logging.

The kernel writes the gradient of each row's loss in the forward pass, unscaled; the backward
multiplies it by grad_output (divided by the number of valid rows for "mean") in fp32 and
rounds the product once to the gradient's dtype, on the device, with no host sync. Each
program owns ROWS whole rows (many for tiny V, one for large V):

    1. stats:    one sweep over the row: the student's running max and sums of exp at T and
                 at 1, the teacher's running max and sum at T (online softmax; dense teacher).
       slots:    top-k only: the teacher's stats over the k slots, then KL from log q_T
                 gathered at the indices.
    2. gradient: a second sweep: log q_T, log q (and the dense teacher's p_t, summing KL
                 element by element, 0 * log 0 = 0) from the stats; writes the gradient.
    3. scatter:  top-k only: subtracts alpha * T * p_t at the k indices of the written row.

Memory traffic per row: the student and a dense teacher are read twice (passes 1 and 2) and
the gradient written once; the k slots are read a few times (k << V). The benchmark's byte
model counts the minimum, one read of each input and one write (see bench.py).

Over 300 lines on purpose: one op in one file, read top-down (launch constants, the
``@triton.jit`` kernel, the host launcher, the autograd Function), as Liger-Kernel lays out its ops.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .reference import KDTerms, _check_args

# Columns per block of the sweeps over a row: 1024 keeps each program's block in registers;
# rows of V <= 1024 are packed ROWS = 1024 // BLOCK_V to a program. Tests rely on V = 1271
# taking two blocks.
BLOCK_V_MAX = 1024
BLOCK_K_MAX = 128  # top-k slots per block
TAIL_FLOOR = tl.constexpr(1e-6)  # the least student tail mass (reference.TAIL_FLOOR)
NUM_WARPS = 4


@triton.jit
def _online_lse(m, d, x, scale):
    """One block of an online log-sum-exp per row: running max m [ROWS], running sum
    d [ROWS] of exp((x - m) * scale), x [ROWS, B] (-inf where masked). New (m, d)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp gives 0, not NaN
    d = d * tl.exp((m - shift) * scale) + tl.sum(tl.exp((x - shift[:, None]) * scale), axis=1)
    return m_new, d


@triton.jit
def _log_softmax(x, m, d, scale):
    """log softmax(x * scale) of a block x [ROWS, B] from its row's max m and sum d [ROWS];
    -inf throughout a row of only -inf (probabilities 0, not NaN)."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    return (x - shift[:, None]) * scale - tl.log(tl.where(d > 0, d, 1.0))[:, None]


@triton.jit
def _load_slots(v_ptr, i_ptr, rows, valid, k0, K, v_stride, i_stride, BLOCK_K: tl.constexpr):
    """One block of top-k slots: values [ROWS, BLOCK_K] (fp32, -inf off the live slots),
    indices (int64) and the live mask (valid row, slot < K, index not -1 padding)."""
    slots = k0 + tl.arange(0, BLOCK_K)
    in_k = valid[:, None] & (slots < K)[None, :]
    idx = tl.load(i_ptr + rows[:, None] * i_stride + slots[None, :], mask=in_k, other=-1)
    idx = idx.to(tl.int64)
    live = in_k & (idx >= 0)
    vals = tl.load(v_ptr + rows[:, None] * v_stride + slots[None, :], mask=live,
                   other=float("-inf")).to(tl.float32)
    return vals, idx, live


@triton.jit
def _kd_loss_kernel(
    s_ptr,  # [N, V] student logits, unit column stride
    t_ptr,  # [N, V] dense teacher logits, or [N, K] top-k teacher values
    i_ptr,  # [N, K] top-k teacher indices, -1 at padding (TOPK only)
    tail_ptr,  # [N] the teacher's mass outside the k slots, at T (HAS_TAIL only)
    y_ptr,  # [N] labels (HAS_LABELS only)
    loss_ptr,  # [N] fp32 per-row loss (out)
    g_ptr,  # [N, V] gradient of each row's loss w.r.t. its logits (out; may be s_ptr)
    terms_ptr,  # [2, N] fp32 per-row soft (T^2 * KL) and hard (CE) terms (out, WRITE_TERMS)
    n_rows, V, K,
    s_stride, t_stride, i_stride, g_stride,
    inv_t, kl_weight, ce_weight,  # 1 / T, alpha * T^2, 1 - alpha
    ignore_index, soft_only_index,  # labels of rows out of the loss / out of the hard term
    TOPK: tl.constexpr,  # teacher given as top-k slots, else dense
    HAS_TAIL: tl.constexpr,  # top-k with a tail slot: the teacher's remaining mass
    HAS_LABELS: tl.constexpr,  # rows whose label is ignore_index are skipped
    HAS_KL: tl.constexpr,  # alpha > 0, or the terms are wanted
    HAS_CE: tl.constexpr,  # alpha < 1 with labels, or the terms are wanted with labels
    WRITE_GRAD: tl.constexpr,
    WRITE_TERMS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Scalars arrive as fp64 from Inductor; fp64 would spread through the arithmetic.
    inv_t = tl.cast(inv_t, tl.float32)
    kl_weight = tl.cast(kl_weight, tl.float32)
    ce_weight = tl.cast(ce_weight, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: N * V > 2^31
    row_in = rows < n_rows
    valid = row_in
    if HAS_LABELS:
        y = tl.load(y_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        valid = row_in & (y != ignore_index)
        labelled = valid & (y != soft_only_index)  # rows of the hard term
    s_row = s_ptr + rows[:, None] * s_stride  # [ROWS, 1]
    t_row = t_ptr + rows[:, None] * t_stride

    # 1. stats: one sweep over the row.
    m_s = tl.full((ROWS,), float("-inf"), tl.float32)
    d_st = tl.zeros((ROWS,), tl.float32)  # sum exp((z_s - m_s) / T)
    d_s1 = tl.zeros((ROWS,), tl.float32)  # sum exp(z_s - m_s)
    m_t = tl.full((ROWS,), float("-inf"), tl.float32)
    d_t = tl.zeros((ROWS,), tl.float32)  # sum exp((z_t - m_t) / T)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        live = valid[:, None] & (cols < V)[None, :]
        z_s = tl.load(s_row + cols[None, :], mask=live, other=float("-inf")).to(tl.float32)
        m_new, d_st = _online_lse(m_s, d_st, z_s, inv_t)
        if HAS_CE:
            _, d_s1 = _online_lse(m_s, d_s1, z_s, 1.0)
        m_s = m_new
        if HAS_KL and not TOPK:
            z_t = tl.load(t_row + cols[None, :], mask=live, other=float("-inf")).to(tl.float32)
            m_t, d_t = _online_lse(m_t, d_t, z_t, inv_t)

    ce = tl.zeros((ROWS,), tl.float32)
    if HAS_CE:  # CE = logsumexp(z_s) - z_s[y]; a label outside [0, V) gives NaN (no raising here)
        y_in = labelled & (y >= 0) & (y < V)
        z_y = tl.load(s_ptr + rows * s_stride + tl.where(y_in, y, 0), mask=y_in).to(tl.float32)
        ce = tl.where(labelled, m_s + tl.log(d_s1) - tl.where(y_in, z_y, float("nan")), 0.0)

    kl = tl.zeros((ROWS,), tl.float32)
    tail = tl.zeros((ROWS,), tl.float32)
    log_kept = tl.zeros((ROWS,), tl.float32)  # log of the slots' share, 1 - tail
    if HAS_TAIL:
        tail = tl.load(tail_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        tail = tl.minimum(tl.maximum(tail, 0.0), 1.0)
        log_kept = tl.log(1.0 - tail)
    q_slots = tl.zeros((ROWS,), tl.float32)  # the student's mass at the teacher's indices
    if HAS_KL and TOPK:  # slots: the teacher's stats over the k slots, then KL over them
        for k0 in range(0, K, BLOCK_K):
            vals, idx, live = _load_slots(t_ptr, i_ptr, rows, valid, k0, K, t_stride, i_stride,
                                          BLOCK_K)
            m_t, d_t = _online_lse(m_t, d_t, vals, inv_t)
        for k0 in range(0, K, BLOCK_K):
            vals, idx, live = _load_slots(t_ptr, i_ptr, rows, valid, k0, K, t_stride, i_stride,
                                          BLOCK_K)
            log_p = _log_softmax(vals, m_t, d_t, inv_t) + log_kept[:, None]
            p = tl.where(live, tl.exp(log_p), 0.0)
            gather = live & (idx < V)
            z_s = tl.load(s_row + tl.where(gather, idx, 0), mask=gather).to(tl.float32)
            z_s = tl.where(live & (idx >= V), float("nan"), z_s)  # index out of range: NaN
            log_q_t = _log_softmax(z_s, m_s, d_st, inv_t)
            kl += tl.sum(tl.where(p > 0, p * (log_p - log_q_t), 0.0), axis=1)
            q_slots += tl.sum(tl.where(live, tl.exp(log_q_t), 0.0), axis=1)
    # P = sum of p_t over the slots: 1 - tail, or 0 for a top-k row of padding only.
    p_mass = tl.where(d_t > 0, 1.0, 0.0) * (1.0 - tail)
    tail_ratio = tl.zeros((ROWS,), tl.float32)  # tail / q_tail: spreads the tail over q
    if HAS_TAIL:  # the tail slot: KL of the teacher's remaining mass against the student's
        q_tail = 1.0 - q_slots
        floored = q_tail < TAIL_FLOOR  # below it, fp32 cannot resolve 1 - q_slots
        q_tail = tl.maximum(q_tail, TAIL_FLOOR)
        kl += tl.where(tail > 0, tail * (tl.log(tail) - tl.log(q_tail)), 0.0)
        # d/dz_s[j] of tail * -log q_tail = (tail * q_T[j] - tail_ratio * q_T[j] [j not a
        # slot]) / T; a floored q_tail is a constant, with no gradient.
        p_mass += tl.where(floored, 0.0, tail)
        tail_ratio = tl.where(floored, 0.0, tail / q_tail)

    # In place (g_ptr == s_ptr), no store below may overtake another thread's load above.
    tl.debug_barrier()

    # 2. gradient: a second sweep; the dense teacher's KL is summed on the way.
    if WRITE_GRAD or (HAS_KL and not TOPK):
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            live = valid[:, None] & (cols < V)[None, :]
            z_s = tl.load(s_row + cols[None, :], mask=live, other=float("-inf")).to(tl.float32)
            grad = tl.zeros((ROWS, BLOCK_V), tl.float32)
            if HAS_KL:
                log_q_t = _log_softmax(z_s, m_s, d_st, inv_t)
                grad += (kl_weight * inv_t) * tl.exp(log_q_t) * (p_mass - tail_ratio)[:, None]
                if not TOPK:
                    z_t = tl.load(t_row + cols[None, :], mask=live,
                                  other=float("-inf")).to(tl.float32)
                    log_p = _log_softmax(z_t, m_t, d_t, inv_t)
                    p = tl.exp(log_p)
                    kl += tl.sum(tl.where(p > 0, p * (log_p - log_q_t), 0.0), axis=1)
                    grad -= (kl_weight * inv_t) * p
            if HAS_CE:
                q = tl.exp(_log_softmax(z_s, m_s, d_s1, 1.0))
                one_hot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
                grad += tl.where(labelled[:, None], ce_weight * (q - one_hot), 0.0)
            if WRITE_GRAD:  # zeros on invalid rows
                g_out = tl.where(valid[:, None], grad, 0.0).to(g_ptr.dtype.element_ty)
                tl.store(g_ptr + rows[:, None] * g_stride + cols[None, :], g_out,
                         mask=row_in[:, None] & (cols < V)[None, :])

    # 3. scatter: the top-k teacher's -alpha * T * p_t at its indices (distinct in a row), and
    # the tail's term taken back there (pass 2 wrote it at every column).
    if WRITE_GRAD and HAS_KL and TOPK:
        tl.debug_barrier()  # the gradient stores above precede these loads of other threads
        for k0 in range(0, K, BLOCK_K):
            vals, idx, live = _load_slots(t_ptr, i_ptr, rows, valid, k0, K, t_stride, i_stride,
                                          BLOCK_K)
            log_p = _log_softmax(vals, m_t, d_t, inv_t) + log_kept[:, None]
            p = tl.where(live, tl.exp(log_p), 0.0)
            at = live & (idx < V)
            g_at = g_ptr + rows[:, None] * g_stride + tl.where(at, idx, 0)
            g = tl.load(g_at, mask=at).to(tl.float32)
            g -= (kl_weight * inv_t) * p
            if HAS_TAIL:
                z_s = tl.load(s_row + tl.where(at, idx, 0), mask=at).to(tl.float32)
                q_t = tl.exp(_log_softmax(z_s, m_s, d_st, inv_t))
                g += (kl_weight * inv_t) * tail_ratio[:, None] * q_t
            tl.store(g_at, g.to(g_ptr.dtype.element_ty), mask=at)

    # A term of weight 0 stays out of the loss, so its inf or NaN cannot make the loss NaN.
    loss = tl.where(ce_weight > 0, ce_weight * ce, 0.0)
    if HAS_KL:
        loss += tl.where(kl_weight > 0, kl_weight * kl, 0.0)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_in)
    if WRITE_TERMS:
        tl.store(terms_ptr + rows, tl.where(valid, kl / (inv_t * inv_t), 0.0), mask=row_in)
        tl.store(terms_ptr + n_rows + rows, ce, mask=row_in)


def _launch(student, teacher, labels, values, indices, tail, consts, grad, terms):
    """Runs the kernel on rows already flattened: student [N, V] with a unit column stride,
    a dense teacher [N, V] or top-k values and indices [N, k] (and a tail [N] or None),
    labels [N] or None; ``consts``
    is (temperature, alpha, ignore_index, soft_only_index). Writes the gradient into ``grad``
    ([N, V], may be ``student`` itself) and the per-row terms into ``terms`` ([2, N] fp32),
    each unless it is None. Returns the per-row loss [N] in fp32."""
    temperature, alpha, ignore_index, soft_only_index = consts
    n_rows, vocab = student.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss
    topk = teacher is None
    t_in = values if topk else teacher
    k = values.shape[1] if topk else 0
    block_v = min(triton.next_power_of_2(vocab), BLOCK_V_MAX)
    rows = BLOCK_V_MAX // block_v  # tiny V: many rows per program
    block_k = min(triton.next_power_of_2(max(k, 1)), BLOCK_K_MAX)
    unused = student  # pointer for an input the switches leave unread
    has_labels, want_terms = labels is not None, terms is not None
    wrap_triton(_kd_loss_kernel)[(triton.cdiv(n_rows, rows),)](
        student, t_in, indices if topk else unused, unused if tail is None else tail,
        unused if labels is None else labels, loss, unused if grad is None else grad,
        loss if terms is None else terms,
        n_rows, vocab, k,
        student.stride(0), t_in.stride(0), indices.stride(0) if topk else 0,
        0 if grad is None else grad.stride(0),
        1.0 / temperature, alpha * temperature**2, 1.0 - alpha, ignore_index, soft_only_index,
        TOPK=topk, HAS_TAIL=tail is not None, HAS_LABELS=has_labels, HAS_KL=alpha > 0 or want_terms,
        HAS_CE=has_labels and (alpha < 1 or want_terms), WRITE_GRAD=grad is not None,
        WRITE_TERMS=want_terms, ROWS=rows, BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return loss


@triton_op("kdscale::kd_loss_fwd", mutates_args=())
def _kd_loss_fwd(student: torch.Tensor, teacher: torch.Tensor | None,
                 labels: torch.Tensor | None, values: torch.Tensor | None,
                 indices: torch.Tensor | None, tail: torch.Tensor | None, temperature: float,
                 alpha: float, ignore_index: int, soft_only_index: int, write_grad: bool,
                 write_terms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [N], the gradient of each row's loss [N, V] (empty unless write_grad) and
    the per-row soft and hard terms [2, N] (empty unless write_terms)."""
    grad = torch.empty(student.shape if write_grad else (0,), dtype=student.dtype,
                       device=student.device)
    terms = torch.empty((2, student.shape[0]) if write_terms else (0,), dtype=torch.float32,
                        device=student.device)
    consts = (temperature, alpha, ignore_index, soft_only_index)
    loss = _launch(student, teacher, labels, values, indices, tail, consts,
                   grad if write_grad else None, terms if write_terms else None)
    return loss, grad, terms


@triton_op("kdscale::kd_loss_fwd_inplace", mutates_args={"student"})
def _kd_loss_fwd_inplace(student: torch.Tensor, teacher: torch.Tensor | None,
                         labels: torch.Tensor | None, values: torch.Tensor | None,
                         indices: torch.Tensor | None, tail: torch.Tensor | None,
                         temperature: float, alpha: float,
                         ignore_index: int, soft_only_index: int,
                         write_terms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] and terms [2, N] (empty unless write_terms); the gradient of each
    row's loss overwrites ``student``."""
    terms = torch.empty((2, student.shape[0]) if write_terms else (0,), dtype=torch.float32,
                        device=student.device)
    consts = (temperature, alpha, ignore_index, soft_only_index)
    loss = _launch(student, teacher, labels, values, indices, tail, consts, student,
                   terms if write_terms else None)
    return loss, terms


class _KDLoss(torch.autograd.Function):
    """Forward: one launch of the kernel (loss, gradient and, when asked, the two terms);
    backward: the saved gradient times grad_output."""

    @staticmethod
    def forward(ctx, student, teacher, labels, values, indices, tail, temperature, alpha,
                ignore_index, soft_only_index, reduction, inplace, want_terms):
        args = (student, teacher, labels, values, indices, tail, temperature, alpha,
                ignore_index, soft_only_index)
        if inplace:
            grad = student
            row_loss, terms = torch.ops.kdscale.kd_loss_fwd_inplace(*args, want_terms)
        else:
            row_loss, grad, terms = torch.ops.kdscale.kd_loss_fwd(*args, True, want_terms)
        count = _valid_count(labels, ignore_index, student)
        ctx.save_for_backward(grad, count)
        ctx.reduction, ctx.inplace = reduction, inplace
        soft, hard = (_reduce(t, count, reduction) for t in terms) if want_terms else (None,) * 2
        if want_terms:
            ctx.mark_non_differentiable(soft, hard)  # one call: a second replaces the first
        return _reduce(row_loss, count, reduction), soft, hard

    @staticmethod
    def backward(ctx, grad_output, _grad_soft, _grad_hard):
        grad, count = ctx.saved_tensors
        scale = grad_output.float()
        if ctx.reduction == "mean":
            scale = scale / count
        # An fp32 [N, 1] or [1, 1] factor: the product is computed in fp32 and rounded once
        # to the gradient's dtype (a bf16 factor would round the scale too).
        scale = scale.reshape(-1, 1)
        out = grad if ctx.inplace else torch.empty_like(grad)
        # In place only where the caller gave up the logits (and with them a second backward).
        torch.mul(grad, scale, out=out)
        return out, *(None,) * 12


def _valid_count(labels, ignore_index, student):
    """The number of valid rows, at least 1, as a device tensor: the mean needs no host sync."""
    if labels is None:
        return torch.full((), max(student.shape[0], 1), device=student.device)
    return (labels != ignore_index).sum().clamp(min=1)


def _reduce(row_values, count, reduction):
    if reduction == "none":
        return row_values
    return row_values.sum() / count if reduction == "mean" else row_values.sum()


def _flatten(student, teacher, labels, values, indices, tail):
    """Rows of (N, V) with a unit column stride, labels (N,), top-k slots (N, k), tail (N,)."""
    vocab = student.shape[-1]
    rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  (..., X) -> (N, X)
    unit_cols = lambda x: x if x.stride(-1) == 1 else x.contiguous()  # noqa: E731
    student = unit_cols(student.reshape(-1, vocab))
    if teacher is not None:
        teacher = unit_cols(teacher.detach().reshape(-1, vocab))
    if labels is not None:
        labels = labels.reshape(-1).to(student.device).contiguous()
    if values is not None:
        values, indices = rows(values.detach()).contiguous(), rows(indices).contiguous()
    if tail is not None:
        tail = tail.detach().reshape(-1).contiguous()
    return student, teacher, labels, values, indices, tail


def _check_devices(student, teacher, values, indices, tail):
    for name, x in [("teacher_logits", teacher), ("teacher_topk_values", values),
                    ("teacher_topk_indices", indices), ("teacher_topk_tail", tail)]:
        if x is not None and x.device != student.device:
            raise ValueError(f"{name} is on {x.device}, student_logits on {student.device}")
    if student.device.type != "cuda" and isinstance(_kd_loss_kernel, triton.runtime.JITFunction):
        raise RuntimeError("the Triton path runs on CUDA tensors, or on CPU ones under the "
                           "Triton interpreter: set TRITON_INTERPRET=1 before it is imported")


def kd_loss_triton(student_logits, teacher_logits=None, labels=None, *,
                   teacher_topk_values=None, teacher_topk_indices=None, teacher_topk_tail=None,
                   temperature=1.0, alpha=0.5, ignore_index=-100, reduction="mean",
                   inplace_grad=False):
    """``kd_loss`` through the Triton kernel; arguments and result as in ``reference.py``.

    ``inplace_grad=True`` writes the gradient over ``student_logits`` in the forward pass
    (saving one (..., V) buffer): pass a model's output that nothing else needs afterwards;
    the graph then allows a single backward. Top-k indices must be distinct within a row
    (as ``torch.topk`` gives); a label or index outside [0, V) gives a NaN row, not an error.
    A tail slot (``teacher_topk_tail``) rules out ``inplace_grad``: its gradient reads the
    logits at the slots after the sweep that overwrites them.
    """
    teacher = (teacher_topk_values, teacher_topk_indices, teacher_topk_tail)
    return _fused(student_logits, teacher_logits, labels, teacher,
                  (temperature, alpha, ignore_index, None), reduction, inplace_grad,
                  want_terms=False).loss


def kd_loss_terms_triton(student_logits, teacher_logits=None, labels=None, *,
                         teacher_topk_values=None, teacher_topk_indices=None,
                         teacher_topk_tail=None, temperature=1.0, alpha=0.5, ignore_index=-100,
                         soft_only_index=None, reduction="mean", inplace_grad=False):
    """``kd_loss_terms`` through the Triton kernel: the loss, its gradient and both terms in
    one launch; arguments as in ``kd_loss_triton`` and ``reference.kd_loss_terms_reference``."""
    teacher = (teacher_topk_values, teacher_topk_indices, teacher_topk_tail)
    return _fused(student_logits, teacher_logits, labels, teacher,
                  (temperature, alpha, ignore_index, soft_only_index), reduction, inplace_grad,
                  want_terms=True)


def _fused(student_logits, teacher_logits, labels, topk, options, reduction, inplace_grad,
           want_terms):
    temperature, alpha, ignore_index, soft_only_index = options
    values, indices, tail = topk
    _check_args(student_logits, teacher_logits, labels, values, indices, temperature, alpha,
                reduction, tail)
    _check_devices(student_logits, teacher_logits, values, indices, tail)
    if inplace_grad and student_logits.is_leaf and student_logits.requires_grad:
        raise ValueError("inplace_grad writes the gradient over student_logits, which is a leaf: "
                         "its .grad would be the tensor itself; pass a model's output instead")
    if inplace_grad and tail is not None:
        raise ValueError("inplace_grad cannot be used with teacher_topk_tail: the tail's "
                         "gradient reads the logits after they are overwritten")
    lead_shape = student_logits.shape[:-1]
    args = _flatten(student_logits, teacher_logits, labels, values, indices, tail)
    # Without a soft-only label, the ignored label stands in: it marks no valid row.
    soft_only = ignore_index if soft_only_index is None else soft_only_index
    consts = (float(temperature), float(alpha), int(ignore_index), int(soft_only))
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss, soft, hard = _KDLoss.apply(*args, *consts, reduction, inplace_grad, want_terms)
    else:
        row_loss, _, terms = torch.ops.kdscale.kd_loss_fwd(*args, *consts, False, want_terms)
        count = _valid_count(args[2], ignore_index, args[0])
        loss = _reduce(row_loss, count, reduction)
        soft, hard = (_reduce(t, count, reduction) for t in terms) if want_terms else (None,) * 2
    if reduction == "none":
        loss, soft, hard = (x if x is None else x.reshape(lead_shape) for x in (loss, soft, hard))
    return KDTerms(loss, soft, hard)

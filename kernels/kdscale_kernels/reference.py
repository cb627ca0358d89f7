"""The pure-PyTorch distillation loss: the definition every other path is tested against,
and the path used off CUDA.

Rows r = 1..N are the leading dims flattened; V outputs per row. Row r is valid when
``labels[r] != ignore_index`` (every row is valid when no labels are given; then the hard
term is off and alpha must be 1). With temperature T::

    p_t     = softmax(z_t / T)
    log q_T = log_softmax(z_s / T)
    log q   = log_softmax(z_s)
    KL_r    = sum_v p_t[v] * (log p_t[v] - log q_T[v])        (0 * log 0 = 0)
    CE_r    = -log q[y_r]
    loss    = (1 / N_valid) * sum_{valid r} (alpha * T^2 * KL_r + (1 - alpha) * CE_r)

A row labelled ``soft_only_index`` (an augmented copy that only the teacher labelled) is valid
and has CE_r = 0: it counts in N_valid and in the soft term, not in the hard one.
``kd_loss_terms`` also returns the two terms, T^2 * KL and CE, reduced as the loss is.

``reduction="sum"`` drops the 1 / N_valid; ``"none"`` returns the per-row values shaped like
the leading dims, 0 for invalid rows. With no valid row the loss and its gradient are 0.

Top-k teacher (``values[N, k]``, ``indices[N, k]``, padding slots have index -1): p_t is
``softmax(values / T)`` over the non-padding slots, log q_T is gathered at ``indices``, and
KL_r sums over the k slots. A row whose slots are all padding has KL_r = 0.

Top-k with a tail slot (``tail[N]``: the teacher's probability mass outside its k slots at
T, from the full distribution when the cache was written): the slots keep 1 - tail of the
mass, ``p_t = (1 - tail) * softmax(values / T)``, and one more slot holds the rest against
the student's mass outside the same indices, ``q_tail = 1 - sum_slots q_T``::

    KL_r = sum_slots p_t (log p_t - log q_T)  +  tail * (log tail - log q_tail)

q_tail is floored at TAIL_FLOOR (below it fp32 cannot resolve 1 - sum_slots q_T), and a
floored q_tail is a constant: it has no gradient. With the tail, the slots and the tail
together hold the teacher's whole distribution, so the soft term has no truncation bias.

Everything is computed in fp32 whatever the input dtype, and the loss is fp32. The teacher is
detached: the gradient flows to the student logits only.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")
TAIL_FLOOR = 1e-6  # the least student tail mass; fused.TAIL_FLOOR is the same


class KDTerms(NamedTuple):
    """The loss and its two terms, each reduced as the loss is."""

    loss: torch.Tensor  # alpha * soft + (1 - alpha) * hard, with its graph
    soft: torch.Tensor | None  # T^2 * KL, detached (None from plain kd_loss)
    hard: torch.Tensor | None  # CE of the rows with a hard label, detached (as soft)


def kd_loss_reference(
    student_logits,
    teacher_logits=None,
    labels=None,
    *,
    teacher_topk_values=None,
    teacher_topk_indices=None,
    teacher_topk_tail=None,
    temperature=1.0,
    alpha=0.5,
    ignore_index=-100,
    reduction="mean",
):
    """The distillation loss in plain PyTorch: the definition, and the path off CUDA.

    Every other path is tested against it; the module docstring gives the formulas.

    Args:
        student_logits: (..., V) student logits; leading dimensions are flattened to rows.
        teacher_logits: (..., V) teacher logits (a dense teacher). Give this, or both of
        teacher_topk_values: (..., k) the teacher's k largest logits per row, and
        teacher_topk_indices: (..., k) their vocabulary indices; -1 marks an empty slot.
        teacher_topk_tail: optional (...) with top-k: the teacher's mass outside the k
            slots at this temperature, the tail slot (see the module docstring).
        labels: (...) class ids for the hard term; rows labelled `ignore_index` are left
            out. None: every row counts, the hard term is off and `alpha` must be 1.
        temperature: T > 0, applied to both distributions of the soft term.
        alpha: weight of the soft term in [0, 1]; 1 - alpha weighs the cross-entropy.
        ignore_index: the label of a row that is not part of the loss.
        reduction: "mean" (over the valid rows, 0 when there are none), "sum", or "none"
            (per-row values shaped like the leading dims of `student_logits`, 0 on ignored
            rows).

    Returns:
        The loss, in fp32 whatever the input dtype: 0-d for "mean" and "sum", per row for
        "none". Its gradient flows to `student_logits` only.

    Raises:
        ValueError: not exactly one teacher, shapes that do not match the student's rows,
            non-integer labels or indices, or temperature, alpha or reduction out of range
            (alpha must be 1 without labels).
    """
    options = (temperature, alpha, ignore_index, None)
    topk = (teacher_topk_values, teacher_topk_indices, teacher_topk_tail)
    return _terms(student_logits, teacher_logits, labels, topk, options, reduction,
                  want_terms=False).loss


def kd_loss_terms_reference(
    student_logits,
    teacher_logits=None,
    labels=None,
    *,
    teacher_topk_values=None,
    teacher_topk_indices=None,
    teacher_topk_tail=None,
    temperature=1.0,
    alpha=0.5,
    ignore_index=-100,
    soft_only_index=None,
    reduction="mean",
):
    """The loss and its soft (T^2 * KL) and hard (CE) terms, in one pass: what training logs.

    Args:
        soft_only_index: the label of a row that has the soft term only (an augmented copy);
            None: none. The other arguments are ``kd_loss_reference``'s.

    Returns:
        A ``KDTerms``: the loss, with its graph, and the two terms, detached, each reduced as
        the loss is (a mean over the same valid rows, so loss = alpha * soft + (1 - alpha) *
        hard). Both terms are computed whatever alpha is; a term of weight 0 stays out of the
        loss and its graph.

    Raises:
        ValueError: as ``kd_loss_reference``.
    """
    options = (temperature, alpha, ignore_index, soft_only_index)
    topk = (teacher_topk_values, teacher_topk_indices, teacher_topk_tail)
    return _terms(student_logits, teacher_logits, labels, topk, options, reduction,
                  want_terms=True)


def _terms(student_logits, teacher_logits, labels, topk, options, reduction, want_terms):
    temperature, alpha, ignore_index, soft_only_index = options
    _check_args(student_logits, teacher_logits, labels, *topk[:2], temperature, alpha,
                reduction, topk[2])
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    z_s = student_logits.reshape(-1, vocab).float()  # (N, V)
    valid = _valid_rows(z_s, labels, ignore_index)  # (N,) bool
    # Zero the logits of ignored rows (the teacher's too) so that inf/NaN there cannot reach
    # the loss or any gradient: a where() on the per-row loss alone back-propagates 0 * NaN.
    z_s = torch.where(valid[:, None], z_s, 0.0)
    soft = hard = z_s.new_zeros(z_s.shape[0])  # (N,)
    if alpha > 0 or want_terms:
        with torch.set_grad_enabled(alpha > 0 and torch.is_grad_enabled()):
            soft = temperature**2 * _kl_rows(z_s, teacher_logits, topk, valid, temperature)
    if labels is not None and (alpha < 1 or want_terms):
        labelled = valid if soft_only_index is None else \
            valid & (labels.reshape(-1).to(z_s.device) != soft_only_index)
        with torch.set_grad_enabled(alpha < 1 and torch.is_grad_enabled()):
            hard = torch.where(labelled, _ce_rows(z_s, labels, labelled), 0.0)
    # A term of weight 0 stays out of the loss: its inf or NaN cannot make the loss NaN.
    row_loss = z_s.new_zeros(z_s.shape[0])
    for weight, term in ((alpha, soft), (1 - alpha, hard)):
        if weight > 0:
            row_loss = row_loss + weight * term
    reduce = lambda rows: _reduce(torch.where(valid, rows, 0.0), valid, lead_shape,  # noqa: E731
                                  reduction)
    if not want_terms:
        return KDTerms(reduce(row_loss), None, None)
    return KDTerms(reduce(row_loss), reduce(soft).detach(), reduce(hard).detach())


def _valid_rows(z_s, labels, ignore_index):
    if labels is None:
        return torch.ones(z_s.shape[0], dtype=torch.bool, device=z_s.device)
    return labels.reshape(-1).to(z_s.device) != ignore_index


def _kl_rows(z_s, teacher_logits, topk, valid, temperature):
    """KL_r = sum p_t * (log p_t - log q_T) over the vocabulary or the top-k slots (and the
    tail slot); (N,)."""
    log_q_t = F.log_softmax(z_s / temperature, dim=-1)  # (N, V)
    if teacher_logits is not None:
        log_p_t, p_t = _dense_teacher(teacher_logits, valid, temperature, z_s.shape)
    else:
        values, indices, tail = topk
        log_p_t, p_t, slots = _topk_teacher(values, indices, valid, temperature, tail)
        log_q_all, log_q_t = log_q_t, log_q_t.gather(1, slots)  # (N, k)
    # 0 * log 0 = 0; where() also keeps the gradient of slots with p_t = 0 at exactly 0.
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_q_t), 0.0)
    kl = terms.sum(dim=-1)
    if teacher_logits is None and tail is not None:
        kl = kl + _tail_kl(tail, valid, log_q_t, slots, indices, log_q_all)
    return kl


def _tail_kl(tail, valid, log_q_slots, slots, indices, log_q_all):
    """tail * (log tail - log q_tail), q_tail the student's mass off the teacher's slots;
    (N,)."""
    live = indices.reshape(slots.shape) >= 0
    q_tail = 1 - torch.where(live, log_q_slots.exp(), 0.0).sum(dim=-1)
    q_tail = q_tail.clamp(min=TAIL_FLOOR)  # a floored value has no gradient, as in fused.py
    tail = torch.where(valid, tail.detach().reshape(-1).float().clamp(0, 1), 0.0)
    return torch.where(tail > 0, tail * (tail.clamp(min=1e-38).log() - q_tail.log()), 0.0)


def _dense_teacher(teacher_logits, valid, temperature, shape):
    """log p_t and p_t over the full vocabulary; (N, V) each."""
    z_t = teacher_logits.detach().reshape(shape).float()  # (N, V)
    z_t = torch.where(valid[:, None], z_t, 0.0)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)  # (N, V)
    return log_p_t, log_p_t.exp()


def _topk_teacher(values, indices, valid, temperature, tail=None):
    """log p_t and p_t over the k slots (0 at padding), and the slots to gather; (N, k) each.
    With a tail, the slots hold 1 - tail of the mass."""
    k = values.shape[-1]
    indices = indices.reshape(-1, k).long()  # (N, k)
    pad = indices < 0
    z_t = values.detach().reshape(-1, k).float()  # (N, k)
    z_t = torch.where(valid[:, None], z_t, 0.0)
    z_t = torch.where(pad, float("-inf"), z_t)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)  # (N, k), NaN on all-padding rows
    if tail is not None:
        kept = 1 - tail.detach().reshape(-1, 1).float().clamp(0, 1)  # (N, 1)
        log_p_t = log_p_t + kept.log()
    p_t = torch.where(pad, 0.0, log_p_t.exp())
    log_p_t = torch.where(pad, 0.0, log_p_t)
    return log_p_t, p_t, indices.clamp(min=0)


def _ce_rows(z_s, labels, valid):
    """CE_r = -log q[y_r], 0 for ignored rows; (N,)."""
    y = torch.where(valid, labels.reshape(-1).to(z_s.device).long(), 0)  # (N,)
    log_q = F.log_softmax(z_s, dim=-1)  # (N, V)
    return -log_q.gather(1, y[:, None]).squeeze(1)


def _reduce(row_loss, valid, lead_shape, reduction):
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    if reduction == "sum":
        return row_loss.sum()
    # A tensor count, not a Python int: the mean needs no host sync.
    return row_loss.sum() / valid.sum().clamp(min=1)


def _check_args(student, teacher, labels, topk_values, topk_indices, temperature, alpha,
                reduction, tail=None):
    if (teacher is None) == (topk_values is None and topk_indices is None):
        raise ValueError("give exactly one teacher: teacher_logits, or "
                         "teacher_topk_values with teacher_topk_indices")
    if student.dim() < 1:
        raise ValueError("student_logits must have at least one dim (..., V), got a scalar")
    lead_shape = tuple(student.shape[:-1])
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} does not match "
                         f"student_logits shape {tuple(student.shape)}")
    if teacher is None:
        _check_topk(topk_values, topk_indices, lead_shape)
    if tail is not None:
        _check_tail(tail, teacher, lead_shape)
    if labels is not None:
        _check_labels(labels, lead_shape)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels is None and alpha != 1:
        raise ValueError(f"without labels there is no hard term, so alpha must be 1, got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _rows_match(shape, lead_shape):
    """Rows given with the student's leading dims, or already flattened to (N,)."""
    return tuple(shape) in (lead_shape, (math.prod(lead_shape),))


def _check_labels(labels, lead_shape):
    if not _rows_match(labels.shape, lead_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the rows of "
                         f"student_logits: expected {lead_shape} or ({math.prod(lead_shape)},)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _check_topk(values, indices, lead_shape):
    if values is None or indices is None:
        raise ValueError("a top-k teacher needs both teacher_topk_values and "
                         "teacher_topk_indices")
    if values.shape != indices.shape:
        raise ValueError(f"teacher_topk_values shape {tuple(values.shape)} does not match "
                         f"teacher_topk_indices shape {tuple(indices.shape)}")
    if values.dim() < 1 or not _rows_match(values.shape[:-1], lead_shape):
        raise ValueError(f"teacher_topk_values shape {tuple(values.shape)} does not match the "
                         f"rows of student_logits: expected {lead_shape + ('k',)} "
                         f"or ({math.prod(lead_shape)}, k)")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"teacher_topk_indices must be an integer tensor, got {indices.dtype}")


def _check_tail(tail, teacher, lead_shape):
    if teacher is not None:
        raise ValueError("teacher_topk_tail goes with a top-k teacher, not with teacher_logits")
    if not _rows_match(tail.shape, lead_shape):
        raise ValueError(f"teacher_topk_tail shape {tuple(tail.shape)} does not match the rows "
                         f"of student_logits: expected {lead_shape} or "
                         f"({math.prod(lead_shape)},)")
    if not tail.is_floating_point():
        raise ValueError(f"teacher_topk_tail must be a floating tensor (a probability mass), "
                         f"got {tail.dtype}")

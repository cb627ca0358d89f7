"""Distillation loss kernels, importable as ``kdscale.kernels``.

This folder installs as ``kdscale.kernels``; it is not a top-level ``kernels`` package, which
would shadow Hugging Face's ``kernels`` library that transformers imports.

``kd_loss`` runs the Triton kernel (``fused.py``) on CUDA tensors and the pure-PyTorch
reference (``reference.py``, the definition of the loss) elsewhere. ``kd_loss_triton`` is the
Triton path on any device: CUDA, or CPU under the Triton interpreter (``TRITON_INTERPRET=1``,
as the tests do).
"""

from .reference import KDTerms, kd_loss_reference, kd_loss_terms_reference

__all__ = ["KDTerms", "kd_loss", "kd_loss_reference", "kd_loss_terms", "kd_loss_terms_reference",
           "kd_loss_terms_triton", "kd_loss_triton"]


def kd_loss(
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
    """The distillation loss: the fused Triton kernel on CUDA tensors, the reference elsewhere.

    Per row, ``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)``,
    reduced over the valid rows; ``reference.py`` holds the definition and formulas.

    Args:
        student_logits: (..., V) student logits; leading dimensions are flattened to rows.
        teacher_logits: (..., V) teacher logits (a dense teacher). Give this, or both of
        teacher_topk_values: (..., k) the teacher's k largest logits per row, and
        teacher_topk_indices: (..., k) their vocabulary indices; -1 marks an empty slot.
        teacher_topk_tail: optional (...) with top-k: the teacher's probability mass outside
            the k slots at this temperature, kept as one more slot (``reference.py``).
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
    loss = kd_loss_triton if student_logits.is_cuda else kd_loss_reference
    return loss(
        student_logits,
        teacher_logits,
        labels,
        teacher_topk_values=teacher_topk_values,
        teacher_topk_indices=teacher_topk_indices,
        teacher_topk_tail=teacher_topk_tail,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def kd_loss_triton(student_logits, teacher_logits=None, labels=None, **options):
    """``kd_loss`` through the Triton kernel, on CUDA or under ``TRITON_INTERPRET=1``.

    Args:
        student_logits: as in ``kd_loss``.
        teacher_logits: as in ``kd_loss``.
        labels: as in ``kd_loss``.
        **options: ``kd_loss``'s keyword arguments, plus ``inplace_grad=True`` to write the
            gradient over ``student_logits`` in the forward pass, saving one (..., V) buffer
            (see ``fused.py``).

    Returns:
        The loss, as ``kd_loss`` returns it.

    Raises:
        ValueError: arguments ``kd_loss`` refuses, a teacher on another device than the
            student, or ``inplace_grad`` on a leaf tensor.
        RuntimeError: CPU tensors without the Triton interpreter.
    """
    # Imported on first use, not with the package: importing the kernels imports triton and
    # fixes whether they compile or run in the interpreter (TRITON_INTERPRET is read then).
    from .fused import kd_loss_triton as triton_path

    return triton_path(student_logits, teacher_logits, labels, **options)


def kd_loss_terms(
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
    """The loss and its soft and hard terms in one call, as training logs them: one launch of
    the fused kernel on CUDA tensors, the reference elsewhere.

    Args:
        soft_only_index: the label of a row that has the soft term only (an augmented copy,
            labelled by the teacher alone); None: none. The other arguments are ``kd_loss``'s.

    Returns:
        A ``KDTerms`` (loss, soft, hard): the loss with its graph, as ``kd_loss`` returns it,
        and T^2 * KL and CE, detached and reduced as the loss is.

    Raises:
        ValueError: as ``kd_loss``.
    """
    if student_logits.is_cuda:
        from .fused import kd_loss_terms_triton as terms
    else:
        terms = kd_loss_terms_reference
    return terms(student_logits, teacher_logits, labels,
                 teacher_topk_values=teacher_topk_values,
                 teacher_topk_indices=teacher_topk_indices,
                 teacher_topk_tail=teacher_topk_tail, temperature=temperature,
                 alpha=alpha, ignore_index=ignore_index, soft_only_index=soft_only_index,
                 reduction=reduction)


def kd_loss_terms_triton(student_logits, teacher_logits=None, labels=None, **options):
    """``kd_loss_terms`` through the Triton kernel, on CUDA or under ``TRITON_INTERPRET=1``;
    ``options`` as in ``kd_loss_triton`` (``inplace_grad`` included), plus ``soft_only_index``.
    """
    from .fused import kd_loss_terms_triton as triton_path

    return triton_path(student_logits, teacher_logits, labels, **options)

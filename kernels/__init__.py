"""Distillation loss kernels, importable as ``kdscale.kernels``."""

from .reference import kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference"]


def kd_loss(
    student_logits,
    teacher_logits=None,
    labels=None,
    *,
    teacher_topk_values=None,
    teacher_topk_indices=None,
    temperature=1.0,
    alpha=0.5,
    ignore_index=-100,
    reduction="mean",
):
    """Distillation loss; see ``kdscale.kernels.reference`` for the definition and formulas."""
    # The Triton kernel (kd_loss.py) will be dispatched here for CUDA inputs.
    return kd_loss_reference(
        student_logits,
        teacher_logits,
        labels,
        teacher_topk_values=teacher_topk_values,
        teacher_topk_indices=teacher_topk_indices,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
    )

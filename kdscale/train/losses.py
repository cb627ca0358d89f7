"""The distillation loss as a module: `kdscale.kernels.kd_loss` (the fused kernel on CUDA,
the reference elsewhere) with the experiment's temperature and alpha."""

from __future__ import annotations

import torch

from kdscale.data.augment import NO_LABEL
from kdscale.kernels import kd_loss, kd_loss_terms


class KDLoss(torch.nn.Module):
    """The distillation loss with an experiment's temperature and alpha, as a module.

    Per row, alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s),
    averaged over the rows whose label is not `ignore_index`; computed by
    `kdscale.kernels.kd_loss`.

    Args:
        temperature: T, which softens both distributions; the T^2 keeps the soft term's
            gradient on the scale of the hard one.
        alpha: the weight of the soft term, in [0, 1].
        ignore_index: the label of a row that is not part of the loss (padding, unmasked
            tokens).
    """

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.temperature, self.alpha, self.ignore_index = temperature, alpha, ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *,
                teacher_topk_values: torch.Tensor | None = None,
                teacher_topk_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The loss, averaged over the valid rows; the arguments are `kd_loss`'s.

        Args:
            student_logits: (..., V) logits of the student.
            teacher_logits: (..., V) logits of the teacher (dense); or, for a top-k teacher,
            teacher_topk_values: (..., k) its k largest logits and
            teacher_topk_indices: (..., k) their vocabulary indices (-1: an empty slot).
            labels: (...) class ids; `ignore_index` leaves a row out. None: every row is a
                row of the soft term alone (then alpha must be 1).

        Returns:
            A 0-d fp32 tensor; its gradient flows to `student_logits` only.

        Raises:
            ValueError: shapes that do not match, or alpha is not 1 without labels.
        """
        return kd_loss(student_logits, teacher_logits, labels,
                       teacher_topk_values=teacher_topk_values,
                       teacher_topk_indices=teacher_topk_indices,
                       temperature=self.temperature, alpha=self.alpha,
                       ignore_index=self.ignore_index)

    def parts(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, reduction: str = "mean",
              **teacher_topk: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and, for logging, its soft (T^2 * KL) and hard (CE) terms.

        One call of `kd_loss_terms` (one launch of the fused kernel on CUDA, one gradient
        buffer) gives the loss and both terms; a term with weight 0 is kept out of the loss
        and its graph (and of any 0 * inf).
        A row labelled NO_LABEL (an augmented copy, labelled by the teacher only) is a row of
        the soft term and not of the hard one; a mean is still over all rows, so each row
        weighs the same: (alpha * T^2 * sum KL + (1 - alpha) * sum of the labelled CE) / rows.

        Args:
            student_logits: (..., V) logits of the student.
            teacher_logits: (..., V) logits of a dense teacher; None for a top-k teacher, or
                for none at all (a hard-label run: alpha 0, and labels are needed).
            labels: (...) class ids; `ignore_index` leaves a row out, NO_LABEL leaves it out
                of the hard term only.
            reduction: "mean" over the rows not labelled `ignore_index`, "sum", or "none"
                (per-row values shaped like the leading dims of `student_logits`).
            **teacher_topk: `teacher_topk_values` and `teacher_topk_indices` of a top-k
                teacher, as `kd_loss` takes them.

        Returns:
            {"loss": the weighted sum, with its graph; "soft": T^2 * KL; "hard": CE}, the two
            terms detached and reduced as the loss is.

        Raises:
            ValueError: no teacher output while alpha is not 0 or labels are missing.
        """
        if teacher_logits is None and not teacher_topk:
            return self._hard_only(student_logits, labels, reduction)
        terms = kd_loss_terms(student_logits, teacher_logits, labels,
                              temperature=self.temperature, alpha=self.alpha,
                              ignore_index=self.ignore_index, soft_only_index=NO_LABEL,
                              reduction=reduction, **teacher_topk)
        return terms._asdict()

    def _hard_only(self, student_logits: torch.Tensor, labels: torch.Tensor | None,
                   reduction: str) -> dict[str, torch.Tensor]:
        """No teacher output (a hard-label run): CE alone, which needs alpha 0 and labels."""
        if self.alpha != 0 or labels is None:
            raise ValueError(f"a loss with no teacher output needs alpha 0 and labels, got "
                             f"alpha {self.alpha} and {'no ' if labels is None else ''}labels")
        rows = self._rows(student_logits, labels) if reduction == "mean" else 1
        flat = labels.masked_fill(labels == NO_LABEL, self.ignore_index).reshape(-1)
        hard = torch.nn.functional.cross_entropy(
            student_logits.reshape(flat.numel(), -1).float(), flat.to(student_logits.device),
            ignore_index=self.ignore_index, reduction="none" if reduction == "none" else "sum")
        hard = hard.reshape(student_logits.shape[:-1]) if reduction == "none" else hard / rows
        return {"loss": hard, "soft": torch.zeros_like(hard).detach(), "hard": hard.detach()}

    def _rows(self, student_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The rows a mean is over (at least 1: no valid row gives a loss of 0, not NaN)."""
        if labels is None:
            return torch.tensor(max(student_logits[..., 0].numel(), 1))
        return (labels != self.ignore_index).sum().clamp(min=1)

    def extra_repr(self) -> str:
        """T and alpha, for `print(module)`."""
        return f"temperature={self.temperature}, alpha={self.alpha}"

"""The distillation loss as a module: `kdscale.kernels.kd_loss` (the fused kernel on CUDA,
the reference elsewhere) with the experiment's temperature and alpha."""

from __future__ import annotations

import torch

from kdscale.kernels import kd_loss


class KDLoss(torch.nn.Module):
    """alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s),
    averaged over the rows whose label is not `ignore_index`."""

    def __init__(self, temperature: float = 2.0, alpha: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.temperature, self.alpha, self.ignore_index = temperature, alpha, ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *,
                teacher_topk_values: torch.Tensor | None = None,
                teacher_topk_indices: torch.Tensor | None = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels,
                       teacher_topk_values=teacher_topk_values,
                       teacher_topk_indices=teacher_topk_indices,
                       temperature=self.temperature, alpha=self.alpha,
                       ignore_index=self.ignore_index)

    def parts(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, reduction: str = "mean",
              **teacher_topk: torch.Tensor) -> dict[str, torch.Tensor]:
        """The total loss and, for logging, its soft (T^2 * KL) and hard (CE) terms. The loss
        is linear in the two, so they are computed once each and combined, not recomputed;
        a term with weight 0 is kept out of the graph (and of any 0 * inf). A top-k teacher
        comes as `teacher_topk_values=` and `teacher_topk_indices=`."""
        kwargs = {"temperature": self.temperature, "ignore_index": self.ignore_index,
                  "reduction": reduction, **teacher_topk}
        terms, loss = {}, 0.0
        for name, term_alpha, weight in (("soft", 1.0, self.alpha), ("hard", 0.0, 1 - self.alpha)):
            with torch.set_grad_enabled(weight > 0 and torch.is_grad_enabled()):
                terms[name] = kd_loss(student_logits, teacher_logits, labels, alpha=term_alpha,
                                      **kwargs)
            if weight > 0:
                loss = loss + weight * terms[name]
            terms[name] = terms[name].detach()
        return {"loss": loss, **terms}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"

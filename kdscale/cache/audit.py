"""How faithful a top-k cache is, measured on a sample of the teacher's full rows while the
cache is written: printed by `kdscale cache` and stored in the manifest (`audit`).

For the first rows the main process computes (AUDIT_ROWS of them) the full distribution is
still at hand. At the loss's temperature T, the audit reports the teacher's mass the k slots
cover, and the error of the soft loss and of its gradient when the teacher is stored as its
top k (renormalized over the slots), as its top k with a tail slot, and as k sampled draws
(kdscale.cache.sampling; its loss value is biased by design, its gradient is not), against
the full teacher. The errors are taken for a uniform student (all logits equal, where training
starts): |L - L_full| / L_full, and ||g - g_full|| / ||g_full|| over the sample.
"""

from __future__ import annotations

import torch

from kdscale.cache.sampling import sampled_rows
from kdscale.kernels import kd_loss_reference

AUDIT_ROWS = 512


class FidelityAudit:
    """Collects up to `rows` full teacher rows [R, V]; `result()` measures them."""

    def __init__(self, k: int, temperature: float, rows: int = AUDIT_ROWS):
        self.k, self.temperature, self.rows = k, temperature, rows
        self._sample: list[torch.Tensor] = []
        self._count = 0

    def add(self, logits: torch.Tensor) -> None:
        if self._count >= self.rows or len(logits) == 0:
            return
        take = logits[: self.rows - self._count].detach().float().cpu()
        self._sample.append(take)
        self._count += len(take)

    def result(self) -> dict | None:
        if not self._sample:
            return None
        teacher = torch.cat(self._sample)
        t = self.temperature
        values, indices = teacher.topk(self.k, dim=-1)
        probs = torch.softmax(teacher / t, dim=-1)
        mass = probs.gather(1, indices).sum(dim=-1)
        stored = {"topk": {"teacher_topk_values": values, "teacher_topk_indices": indices},
                  "topk_tail": {"teacher_topk_values": values, "teacher_topk_indices": indices,
                                "teacher_topk_tail": (1 - mass).clamp(0, 1)}}
        rows = torch.arange(len(teacher))
        drawn = sampled_rows(teacher, rows, torch.zeros_like(rows), self.k, t, seed=0)
        stored["sampled"] = {"teacher_topk_values": drawn["values"],
                             "teacher_topk_indices": drawn["indices"].long()}
        full_loss, full_grad = _loss_and_grad(teacher, t, teacher_logits=teacher)
        errors = {}
        for kind, teacher_args in stored.items():
            loss, grad = _loss_and_grad(teacher, t, **teacher_args)
            errors[kind] = {"loss_error": abs(loss - full_loss) / max(full_loss, 1e-12),
                            "grad_error": float((grad - full_grad).norm()
                                                / full_grad.norm().clamp(min=1e-12))}
        return {"rows": len(teacher), "k": self.k, "temperature": t,
                "mass_covered": float(mass.mean()), "mass_covered_min": float(mass.min()),
                "student": "uniform", **errors}


def _loss_and_grad(teacher: torch.Tensor, temperature: float, **teacher_args):
    """The soft loss of a uniform student and its gradient, for one way of storing the
    teacher."""
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = kd_loss_reference(student, temperature=temperature, alpha=1.0, **teacher_args)
    (grad,) = torch.autograd.grad(loss, student)
    return float(loss), grad


def describe(audit: dict) -> str:
    topk, tail, sampled = audit["topk"], audit["topk_tail"], audit["sampled"]
    return (f"  fidelity on {audit['rows']} rows at T = {audit['temperature']:g}: the top "
            f"{audit['k']} hold {audit['mass_covered']:.1%} of the teacher's mass (least "
            f"{audit['mass_covered_min']:.1%}); against the full teacher, for a uniform "
            f"student: top-k loss error {topk['loss_error']:.1%}, gradient error "
            f"{topk['grad_error']:.1%}; top-k + tail {tail['loss_error']:.1%} and "
            f"{tail['grad_error']:.1%}; {audit['k']} sampled draws, gradient error "
            f"{sampled['grad_error']:.1%}")

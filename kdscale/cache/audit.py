"""How faithful a top-k cache is, measured on a sample of the teacher's full rows while the
cache is written: printed by `kdscale cache` and stored in the manifest (`audit`).

For the first rows the main process computes (AUDIT_ROWS of them) the full distribution is
still at hand. At the loss's temperature T, the audit reports the teacher's mass the k slots
cover, and the error of the soft loss and of its gradient when the teacher is stored as its
top k (renormalized over the slots), as its top k with a tail slot, and as k sampled draws
(kdscale.cache.sampling; its loss value is biased by design, its gradient is not), against
the full teacher. The errors are taken for a uniform student (all logits equal, where training
starts): |L - L_full| / L_full, and ||g - g_full|| / ||g_full|| over the sample.

It also measures what storing the values costs on top of that (`stored`): the cache's own
kind (top-k, with a tail, or sampled) with its values as a reader gets them back (float16
or bfloat16 rounding, or int8 codes dequantized) against the same rows' exact values, and
against the full teacher.
"""

from __future__ import annotations

import torch

from kdscale.cache.quantize import stored_values
from kdscale.cache.sampling import sampled_rows
from kdscale.kernels import kd_loss_reference

AUDIT_ROWS = 512


class FidelityAudit:
    """Collects up to `rows` full teacher rows [R, V]; `result()` measures them, and the
    storage of the cache's `kind` ("topk", "topk_tail" or "sampled") values as `dtype`."""

    def __init__(self, k: int, temperature: float, rows: int = AUDIT_ROWS, *,
                 kind: str = "topk", dtype: str = "float16"):
        self.k, self.temperature, self.rows = k, temperature, rows
        self.kind, self.dtype = kind, dtype
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
        full = _loss_and_grad(teacher, t, teacher_logits=teacher)
        errors = {kind: _errors(_loss_and_grad(teacher, t, **args), full)
                  for kind, args in stored.items()}
        return {"rows": len(teacher), "k": self.k, "temperature": t,
                "mass_covered": float(mass.mean()), "mass_covered_min": float(mass.min()),
                "student": "uniform", **errors,
                "stored": self._storage_errors(teacher, stored[self.kind], full)}

    def _storage_errors(self, teacher: torch.Tensor, exact: dict, full: tuple) -> dict:
        """The cache's kind with its values as stored, against its exact values (what the
        storage adds) and against the full teacher (all it loses)."""
        values = exact["teacher_topk_values"]
        valid = exact["teacher_topk_indices"] >= 0
        as_stored = {**exact, "teacher_topk_values": stored_values(values, valid, self.dtype)}
        loss_grad = _loss_and_grad(teacher, self.temperature, **as_stored)
        exact_loss_grad = _loss_and_grad(teacher, self.temperature, **exact)
        return {"kind": self.kind, "dtype": self.dtype,
                **_errors(loss_grad, exact_loss_grad),
                "against_full": _errors(loss_grad, full)}


def _errors(got: tuple[float, torch.Tensor], want: tuple[float, torch.Tensor]) -> dict:
    """Relative errors of a (loss, gradient) pair against another."""
    (loss, grad), (want_loss, want_grad) = got, want
    return {"loss_error": abs(loss - want_loss) / max(abs(want_loss), 1e-12),
            "grad_error": float((grad - want_grad).norm() / want_grad.norm().clamp(min=1e-12))}


def _loss_and_grad(teacher: torch.Tensor, temperature: float, **teacher_args):
    """The soft loss of a uniform student and its gradient, for one way of storing the
    teacher."""
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = kd_loss_reference(student, temperature=temperature, alpha=1.0, **teacher_args)
    (grad,) = torch.autograd.grad(loss, student)
    return float(loss.detach()), grad


def describe(audit: dict) -> str:
    topk, tail, sampled = audit["topk"], audit["topk_tail"], audit["sampled"]
    return (f"  fidelity on {audit['rows']} rows at T = {audit['temperature']:g}: the top "
            f"{audit['k']} hold {audit['mass_covered']:.1%} of the teacher's mass (least "
            f"{audit['mass_covered_min']:.1%}); against the full teacher, for a uniform "
            f"student: top-k loss error {topk['loss_error']:.1%}, gradient error "
            f"{topk['grad_error']:.1%}; top-k + tail {tail['loss_error']:.1%} and "
            f"{tail['grad_error']:.1%}; {audit['k']} sampled draws, gradient error "
            f"{sampled['grad_error']:.1%}" + _describe_storage(audit.get("stored")))


def _describe_storage(stored: dict | None) -> str:
    if stored is None:  # audited before storage was measured
        return ""
    return (f"\n  stored as {stored['dtype']}, {stored['kind']} rows add a loss error of "
            f"{stored['loss_error']:.3%} and a gradient error of {stored['grad_error']:.3%} "
            f"to the exact values (against the full teacher: "
            f"{stored['against_full']['loss_error']:.1%} and "
            f"{stored['against_full']['grad_error']:.1%})")

"""Non-finite training stops at once. A NaN or infinite loss (weights diverged under too high
a learning rate, or a teacher row that is not finite) is caught at the step it appears, on
every process together, and no checkpoint or model is written from weights that are not
finite: the previous good ones stay where they are."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from kdscale.distributed import reduce_sum
from kdscale.errors import KdscaleError


class NonFiniteError(KdscaleError):
    """Training produced a loss or weights that are not finite; nothing was saved from it."""


def check_step_finite(accelerator: Accelerator, sums: dict[str, torch.Tensor], *, step: int,
                      first_step: int, section: str, learning_rate: float, desc: str) -> None:
    """Raise on every process when any process's loss terms of this step are not finite.

    One scalar all-reduce per step: each process alone would stop while the others wait for
    it in the next collective."""
    terms = {name: value for name, value in sums.items() if name != "rows"}
    bad = {name: value.item() for name, value in terms.items() if not torch.isfinite(value)}
    device = next(iter(terms.values())).device
    if reduce_sum(accelerator, torch.tensor(float(bool(bad)), device=device)).item() == 0:
        return
    shown = ", ".join(f"{name} {value}" for name, value in bad.items()) or "on another process"
    if step == first_step:
        hint = ("before any update changed the weights, so an input is not finite: the "
                "teacher's outputs (rebuild the cache with `kdscale cache`) or the loss settings "
                "(loss.temperature, loss.alpha)")
    else:
        hint = divergence_hint(section, learning_rate)
    raise NonFiniteError(f"{desc}: the loss is not finite at step {step} ({shown}); {hint}. "
                         f"Nothing was saved from this step")


def divergence_hint(section: str, learning_rate: float) -> str:
    return (f"the weights diverged: expected a smaller {section}.learning_rate "
            f"(now {learning_rate:g})")


def check_weights_finite(accelerator: Accelerator, model: torch.nn.Module, what: str,
                         cause: str = "the weights are not finite") -> None:
    """Before `what` is written: every process checks the weights it holds (its ZeRO-3
    partition, where parameters are sharded) and all agree. `cause` opens the error: where
    the weights went wrong and what to change, where the caller knows."""
    local = all(bool(torch.isfinite(_held(p)).all()) for p in model.parameters())
    flag = torch.tensor(0.0 if local else 1.0, device=accelerator.device)
    if reduce_sum(accelerator, flag).item() > 0:
        raise NonFiniteError(f"{cause}; {what} is not written and the previous one, if any, "
                             f"is kept")


def _held(param: torch.Tensor) -> torch.Tensor:
    # Under ZeRO-3 a parameter's own tensor is an empty placeholder; its shard is ds_tensor.
    return getattr(param, "ds_tensor", param).detach()

"""Where a training step's time goes: data (the batch and its cached teacher logits), the
online teacher's forward, the student's forward, the loss, backward, and the optimizer step.

On a GPU, kernels run asynchronously: a phase's wall time only means something if the device
has finished the previous phase's work, so each boundary synchronizes (`sync=True`). That
costs a little overlap, which is why the training config can turn the breakdown off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("data", "teacher", "forward", "loss", "backward", "optimizer")


class StepTimer:
    """Sums of each phase's seconds over a window of steps; `take()` returns the window's mean
    milliseconds per step and starts a new window."""

    def __init__(self, enabled: bool = True, sync: bool | None = None):
        self.enabled = enabled
        self.sync = torch.cuda.is_available() if sync is None else sync
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._seconds[name] += time.perf_counter() - start

    def end_step(self) -> None:
        self._steps += self.enabled

    def take(self) -> tuple[dict[str, float], int]:
        """Mean milliseconds per step of each phase (and their total, `step`) since the last
        take, and the number of steps they cover."""
        steps = self._steps
        means = {name: 1000 * seconds / max(steps, 1) for name, seconds in self._seconds.items()}
        means["step"] = sum(means.values())
        self._seconds, self._steps = dict.fromkeys(PHASES, 0.0), 0
        return {name: round(ms, 3) for name, ms in means.items()}, steps

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


def overall_breakdown(history: list[dict]) -> dict[str, float] | None:
    """Mean milliseconds per step of each phase over a run's log records, each record's
    `step_ms` weighted by the steps it covers (`timed_steps`)."""
    timed = [r for r in history if r.get("timed_steps")]
    if not timed:
        return None
    steps = sum(r["timed_steps"] for r in timed)
    names = timed[0]["step_ms"]
    return {name: round(sum(r["step_ms"][name] * r["timed_steps"] for r in timed) / steps, 3)
            for name in names}


def print_breakdown(accelerator, history: list[dict]) -> None:
    """The run's mean step time per phase, on the main process."""
    breakdown = overall_breakdown(history)
    if breakdown is None:
        return
    total = breakdown["step"] or 1.0
    parts = ", ".join(f"{name} {breakdown[name]:.1f} ms ({breakdown[name] / total:.0%})"
                      for name in PHASES if breakdown[name] > 0)
    accelerator.print(f"step time {breakdown['step']:.1f} ms: {parts}")

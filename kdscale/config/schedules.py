"""Schedules for the distillation temperature and alpha over a run: constant, or linear or
cosine from `start` (step 0) to `end` (the last step). Annealing T from 4 to 1, for example,
lets the student first match the teacher's soft ranking, then its sharp one.

In a config a schedule is a number (constant) or a mapping:
`temperature: {kind: cosine, start: 4.0, end: 1.0}`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import Literal

from kdscale.errors import KdscaleError

Kind = Literal["constant", "linear", "cosine"]
KINDS = typing.get_args(Kind)


@dataclass(frozen=True)
class Schedule:
    kind: Kind = "constant"
    start: float = 1.0
    end: float | None = None  # needed by linear and cosine; constant ignores it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KdscaleError(f"schedule kind: expected one of {', '.join(KINDS)}, "
                              f"got {self.kind!r}")
        _check_number("start", self.start)
        if self.kind != "constant":
            if self.end is None:
                raise KdscaleError(f"schedule: a {self.kind} schedule needs an end value")
            _check_number("end", self.end)

    def value(self, step: int | float, total_steps: int) -> float:
        """The value at `step` of a run of `total_steps` steps; steps outside [0, total] are
        clamped, so the value stays at `end` past the planned last step."""
        if isinstance(total_steps, bool) or not total_steps > 0:
            raise ValueError(f"schedule: total_steps must be > 0, got {total_steps!r}")
        if self.kind == "constant":
            return float(self.start)
        progress = min(max(step, 0), total_steps) / total_steps  # in [0, 1]
        if self.kind == "linear":
            weight = progress
        else:  # cosine: slow at both ends, half-way at the middle
            weight = (1.0 - math.cos(math.pi * progress)) / 2.0
        return float(self.start + (self.end - self.start) * weight)

    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) value over the run: all kinds move monotonically start -> end, so
        a config can check e.g. alpha in [0, 1] once, before training."""
        end = self.start if self.kind == "constant" else self.end
        return (min(self.start, end), max(self.start, end))

    @classmethod
    def from_value(cls, value: float | dict | Schedule) -> Schedule:
        """A config value as a Schedule: a number is constant; a mapping names the fields."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls("constant", float(value))
        if isinstance(value, dict):
            names = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise KdscaleError(f"schedule: unknown keys {unknown}; expected some of {names}")
            return cls(**value)
        raise KdscaleError(f"schedule: expected a number or a mapping with keys kind, start, "
                          f"end, got {value!r}")


def _check_number(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value)):
        raise KdscaleError(f"schedule {name}: expected a finite number, got {value!r}")

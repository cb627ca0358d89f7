"""Temperature/alpha schedules: values at start, middle and end, clamping, validation."""

import math

import pytest

from kdscale.config.schedules import Schedule


def test_constant_ignores_end_and_step():
    schedule = Schedule("constant", 2.0, end=7.0)
    assert [schedule.value(s, 10) for s in (-3, 0, 5, 10, 99)] == [2.0] * 5
    assert schedule.bounds() == (2.0, 2.0)


@pytest.mark.parametrize("step, expected", [(0, 4.0), (25, 3.25), (50, 2.5), (75, 1.75),
                                            (100, 1.0)])
def test_linear_goes_from_start_to_end(step, expected):
    assert Schedule("linear", 4.0, 1.0).value(step, 100) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [
    (0, 4.0),
    (25, 1.0 + 3.0 * (1 + math.cos(math.pi / 4)) / 2),  # ~3.56: cosine is slow at the start
    (50, 2.5),
    (75, 1.0 + 3.0 * (1 + math.cos(3 * math.pi / 4)) / 2),  # ~1.44
    (100, 1.0),
])
def test_cosine_goes_from_start_to_end(step, expected):
    assert Schedule("cosine", 4.0, 1.0).value(step, 100) == pytest.approx(expected)


def test_cosine_stays_above_linear_while_decreasing():
    linear, cosine = Schedule("linear", 1.0, 0.0), Schedule("cosine", 1.0, 0.0)
    assert all(cosine.value(s, 10) > linear.value(s, 10) for s in range(1, 5))
    assert all(cosine.value(s, 10) < linear.value(s, 10) for s in range(6, 10))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_steps_outside_the_run_are_clamped(kind):
    schedule = Schedule(kind, 0.2, 0.8)
    assert schedule.value(-5, 10) == pytest.approx(0.2)
    assert schedule.value(11, 10) == pytest.approx(0.8)
    assert schedule.value(10_000, 10) == pytest.approx(0.8)


def test_increasing_schedule_and_float_steps():
    schedule = Schedule("linear", 0.0, 1.0)
    assert schedule.value(2.5, 10) == pytest.approx(0.25)
    assert schedule.bounds() == (0.0, 1.0)
    assert Schedule("cosine", 4.0, 1.0).bounds() == (1.0, 4.0)


@pytest.mark.parametrize("total", [0, -1, True])
def test_total_steps_must_be_positive(total):
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        Schedule("linear", 1.0, 0.0).value(0, total)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("constant", 1.0).value(0, total)


def test_bad_schedules_fail_when_built():
    with pytest.raises(ValueError, match="expected one of constant, linear, cosine, got 'step'"):
        Schedule("step", 1.0, 0.0)
    with pytest.raises(ValueError, match="linear schedule needs an end"):
        Schedule("linear", 1.0)
    with pytest.raises(ValueError, match="schedule end: expected a finite number"):
        Schedule("cosine", 1.0, math.nan)
    with pytest.raises(ValueError, match="schedule start"):
        Schedule("constant", "4")


def test_from_config_values():
    assert Schedule.from_value(3) == Schedule("constant", 3.0)
    assert Schedule.from_value({"kind": "linear", "start": 4, "end": 1}).value(5, 10) == 2.5
    with pytest.raises(ValueError, match=r"unknown keys \['stop'\]"):
        Schedule.from_value({"kind": "linear", "start": 4, "stop": 1})
    with pytest.raises(ValueError, match="expected a number or a mapping"):
        Schedule.from_value("cosine")

"""The benchmark's goals, each checked on the dev rows and on the held-out test rows.

A KD student's lead over its hard-label control counts as more than noise when it exceeds
`goals.kd_margin_sds` standard deviations of a difference between one KD run and one
hard-label run: sqrt(sd_KD^2 + sd_hard^2), from the seeds' spread of each. With one seed
there is no spread, and that goal is neither met nor missed: `met` is None.
"""

from __future__ import annotations

import math

# split -> (accuracy key, retention key) of a student's summary
SPLITS = {"dev": ("accuracy", "retention"), "test": ("test_accuracy", "test_retention")}


def goal(text: str, split: str, measured: str, met: bool | None) -> dict:
    return {"goal": text, "split": split, "measured": measured, "met": met}


def margin_goal(name: str, kd: dict, hard: dict, sds: float, split: str) -> dict:
    text = (f"{name} KD student ahead of its hard-label control by more than {sds:g} "
            f"standard deviations of the seeds")
    accuracy = SPLITS[split][0]
    margin = kd[accuracy]["mean"] - hard[accuracy]["mean"]
    if kd[accuracy]["std"] is None or hard[accuracy]["std"] is None:
        return goal(text, split, f"{margin:+.4f}; one seed: no spread to compare with", None)
    sd = math.hypot(kd[accuracy]["std"], hard[accuracy]["std"])
    return goal(text, split, f"{margin:+.4f} against {sds:g} x {sd:.4f} = {sds * sd:.4f}",
                margin > sds * sd)


def student_goals(name: str, spec: dict, student: dict, sds: float, split: str) -> list[dict]:
    accuracy, retention = SPLITS[split]
    kd, hard = student["kd"], student["hard"]
    kept = kd[retention]["mean"]
    return [goal(f"{name} KD student keeps >= {spec['retention_goal']:.1%} of the teacher",
                 split, f"{kept:.2%}", kept >= spec["retention_goal"]),
            goal(f"{name} KD student beats its hard-label control (step-matched)", split,
                 f"{kd[accuracy]['mean']:.4f} vs {hard[accuracy]['mean']:.4f}",
                 kd[accuracy]["mean"] > hard[accuracy]["mean"]),
            margin_goal(name, kd, hard, sds, split)]


def speed_goal(settings: dict, kd: dict, base: dict, split: str) -> dict:
    """kdscale's whole pipeline against the baseline's as users run it today: engineering
    and cache together (the ablation takes the ratio apart)."""
    accuracy = SPLITS[split][0]
    ratio = kd["pipeline_s"] / base["pipeline_s"]
    equal = all(kd["students"][n]["kd"][accuracy]["mean"]
                >= base["students"][n]["kd"][accuracy]["mean"] for n in settings["students"])
    limit = settings["goals"]["speed_ratio"]
    return goal(f"kdscale pipeline <= {limit:.0%} of the wall time of the baseline as users "
                f"run it today (engineering and cache together), at equal or better accuracy",
                split, f"{ratio:.0%}, accuracy {'equal or better' if equal else 'lower'}",
                ratio <= limit and equal)


def time_goal(settings: dict, times: dict) -> dict:
    """The goal was set for the main comparison, before the controls and the ablation."""
    minutes = settings["goals"]["total_minutes"]
    return goal(f"main comparison (teachers, KD students, hard-label controls, baseline) "
                f"under {minutes} minutes", "-", f"{times['main_s'] / 60:.1f} min (whole "
                f"benchmark {times['total_s'] / 60:.1f} min)", times["main_s"] <= minutes * 60)


def goals(settings: dict, kd: dict, base: dict | None, times: dict) -> list[dict]:
    sds = settings["goals"]["kd_margin_sds"]
    rows = [row for split in SPLITS for name, spec in settings["students"].items()
            for row in student_goals(name, spec, kd["students"][name], sds, split)]
    if base is not None:
        rows += [speed_goal(settings, kd, base, split) for split in SPLITS]
    if settings["max_train_examples"] is not None:  # --full: the time goal is the subset's
        rows.append(time_goal(settings, times))
    return rows

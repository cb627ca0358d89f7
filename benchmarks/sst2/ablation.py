"""The speed figure taken apart: the plain recipe with kdscale's engineering choices added one
at a time (bench.yaml's `ablation`), the cache last, so that each choice's share of the time
saved is measured rather than credited to the cache.

Each step keeps the options of the steps before it and is a whole pipeline: the teacher
fine-tune (the step before's teacher where this step changes none of its options,
baseline.TEACHER_OPTIONS), the cache where the step has one (the teacher's logits for every
training row, computed once, timed as a stage of its own), and one KD student per size.
Every step trains with the baseline's recipe (rows, epochs, T, alpha, the first K layers) and
the same seed, so only the engineering differs. Step 0, the baseline as users run it today,
is the baseline side's own teacher and its students of that seed, not run a second time.
One seed, the first of `seeds`: the report says so and gives no spread.
"""

from __future__ import annotations

from benchmarks.sst2 import baseline
from benchmarks.sst2.baseline_side import Teacher, student_run, train_teacher
from benchmarks.sst2.evaluation import Evaluator, timed


def cumulative(steps: list[dict]) -> list[tuple[str, dict]]:
    """(label, options) per step: each step's options laid over those of the steps before."""
    options, out = {}, []
    for step in steps:
        extra = {key: value for key, value in step.items() if key != "step"}
        unknown = sorted(set(extra) - set(baseline.OPTIONS))
        if "step" not in step or unknown:
            raise SystemExit(f"ablation: each step is {{step: NAME}} and options among "
                             f"{sorted(baseline.OPTIONS)}; got {step!r}")
        options = {**options, **extra}
        out.append((step["step"], options))
    if out and out[0][1]:
        raise SystemExit("ablation: the first step is the baseline as bench.yaml's `baseline` "
                         f"runs it (the baseline side's own runs); it sets no options, got "
                         f"{out[0][1]}")
    return out


def same_teacher(options: dict, other: dict) -> bool:
    return all(options[key] == other[key] for key in baseline.TEACHER_OPTIONS)


def run_ablation(settings: dict, evaluator: Evaluator, base_side: dict,
                 base_teacher: Teacher) -> dict:
    seed = settings["seeds"][0]
    (first, _), *later = cumulative(settings["ablation"])
    records = [{"step": first, "options": base_teacher.options, "teacher": base_side["teacher"],
                "teacher_shared": False, "cache_s": 0.0, "from_baseline_side": True,
                "students": {name: next(r for r in kinds["kd"] if r["seed"] == seed)
                             for name, kinds in base_side["students"].items()}}]
    teacher = base_teacher
    for label, extra in later:
        options = baseline.options_of({**base_teacher.options, **extra})
        shared = same_teacher(options, teacher.options)
        if not shared:
            teacher = train_teacher(settings, evaluator, options)
        records.append(run_step(settings, evaluator, label, options, teacher, shared, seed))
    return {"seed": seed, "steps": records}


def run_step(settings: dict, evaluator: Evaluator, label: str, options: dict,
             teacher: Teacher, shared: bool, seed: int) -> dict:
    hp, cached, cache_s = settings["baseline"], None, 0.0
    if options["teacher"] == "cached":
        cached, cache_s = timed(baseline.teacher_logits, teacher.model, teacher.rows,
                                hp["distill"])
    students = {name: student_run(evaluator, teacher, hp, options,
                                  list(range(spec["baseline"])), seed, cached)
                for name, spec in settings["students"].items()}
    for name, run in students.items():
        print(f"ablation '{label}' {name}: accuracy {run['accuracy']:.4f} in "
              f"{run['train_s']:.0f} s", flush=True)
    return {"step": label, "options": options, "teacher": teacher.record,
            "teacher_shared": shared, "cache_s": round(cache_s, 2), "students": students}

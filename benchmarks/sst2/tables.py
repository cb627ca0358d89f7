"""report.md: the headline, the models on dev and test, the wall times, the speed ablation
and the goals, from the results that report.build assembles."""

from __future__ import annotations

from benchmarks.sst2.lever_tables import lever_section

KIND_LABELS = {"kd": "KD", "hard": "hard labels, step-matched",
               "kd_no_copies": "KD without copies, step-matched",
               "kd_kdscale_layers": "KD, kdscale's layers"}


def seeds_text(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"one seed ({seeds[0]})"
    return "seeds " + ", ".join(map(str, seeds))


def size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def fmt_acc(s: dict) -> str:
    if s["std"] is None:  # one seed: no spread to show
        return f"{s['mean']:.4f} (one seed)"
    return f"{s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}-{s['max']:.4f})"


def source_line(results: dict) -> str:
    """The code the figures came from: the commit, or the historical label."""
    old = results.get("provenance")
    if old:
        return (f"Historical: added in commit {old['committed_in'][:10]}, measured by that "
                f"code or earlier (runs of that time did not record their commit).")
    commit = results.get("commit")
    if not commit:
        return "Measured outside a git checkout: no commit to name."
    tree = "a clean tree" if results.get("clean_tree") else "a tree with uncommitted changes"
    moved = " (the tree changed while it ran)" if results.get("changed_during_run") else ""
    return f"Measured at commit {commit[:10]}, {tree}{moved}."


def teacher_row(side: str, t: dict) -> str:
    return (f"| {side} teacher | all | {t.get('steps', '-')} | {t['accuracy']:.4f} | "
            f"{t['test']['accuracy']:.4f} | 100% / 100% | {t['params']:,} | "
            f"{t['latency_ms']:.1f} | 1.0x |")


def student_row(label: str, s: dict) -> str:
    return (f"| {label} | {s['teacher_layers']} | {s['steps'] or '-'} | "
            f"{fmt_acc(s['accuracy'])} | {fmt_acc(s['test_accuracy'])} | "
            f"{s['retention']['mean']:.1%} / {s['test_retention']['mean']:.1%} | "
            f"{s['params']:,} | {s['latency_ms']:.1f} | {s['speedup']:.1f}x |")


def model_rows(results: dict) -> list[str]:
    rows = []
    for side in ("kdscale", "baseline"):
        if results[side] is None:
            continue
        rows.append(teacher_row(side, results[side]["teacher"]))
        for name, kinds in results["summary"][side]["students"].items():
            rows += [student_row(f"{side} {name} {KIND_LABELS[kind]}", s)
                     for kind, s in kinds.items()]
    return rows


def time_rows(results: dict) -> list[str]:
    kd, base, summary = results["kdscale"], results["baseline"], results["summary"]

    def cells(ours: float, theirs: float | None, bold: bool = False) -> str:
        mark = "**" if bold else ""
        return (f"{mark}{ours:.0f}{mark} | "
                f"{'-' if theirs is None else f'{mark}{theirs:.0f}{mark}'} |")

    theirs = base["teacher"]["train_s"] if base else None
    lines = [f"| teacher fine-tune | {cells(kd['teacher']['train_s'], theirs)}",
             f"| cache (once) | {kd['cache_s']:.0f} | - |"]
    for n, kinds in summary["kdscale"]["students"].items():
        b = summary["baseline"]["students"][n]["kd"]["train_s"] if base else None
        lines.append(f"| {n} KD student | {cells(kinds['kd']['train_s'], b)}")
    b = summary["baseline"]["pipeline_s"] if base else None
    lines.append(f"| **pipeline** | {cells(summary['kdscale']['pipeline_s'], b, bold=True)}")
    if "cache_no_copies_s" in kd:
        lines.append(f"| cache of the labelled rows alone (the KD-without-copies control's; "
                     f"not in the pipeline) | {kd['cache_no_copies_s']:.0f} | - |")
    return lines


def transfer_rows_text(results: dict) -> str:
    """The KD students' rows beyond the labelled ones: copies and unlabelled rows."""
    unlabelled = results["settings"].get("unlabelled_rows", 0)
    copies = results["transfer_rows"] - results["train_rows"] - unlabelled
    parts = [f"{copies} augmented copies"] if copies else []
    parts += [f"{unlabelled} unlabelled rows of train.tsv (labels dropped)"] if unlabelled else []
    return " and ".join(parts)


def kdscale_recipe(results: dict) -> str:
    """How kdscale's own pipeline differs from the ablation's recipe."""
    s = results["settings"]
    epochs = ", ".join(
        f"{name} {({**s['kd']['distill'], **spec.get('kd', {}).get('distill', {})})['epochs']:g}"
        for name, spec in s["students"].items())
    layers = ", ".join(f"{name} {spec['kdscale']}" for name, spec in s["students"].items())
    return (f"kdscale's row is its real pipeline with its own recipe, not the ablation's: "
            f"{transfer_rows_text(results) or 'no rows'} beside the labelled ones, labelled "
            f"by the teacher in its cache ({results['transfer_rows']} rows in all); KD epochs "
            f"over them: {epochs} "
            f"(the ablation: {s['baseline']['distill']['epochs']:g} over the labelled rows); "
            f"teacher layers {layers} (the ablation: the first K); students of "
            f"{seeds_text(s['seeds'])}.")


def ablation_rows(results: dict) -> list[str]:
    raw, summary = results["ablation"], results["summary"]["ablation"]
    names = list(results["settings"]["students"])
    head = ["| step | teacher (s) | cache (s) | " + " | ".join(f"{n} (s)" for n in names)
            + " | pipeline (s) | of step 0 | saving on the step before (s) | share of the "
            "saving | dev: teacher / " + " / ".join(names) + " | test: teacher / "
            + " / ".join(names) + " |", "|---" * (9 + len(names)) + "|"]
    for i, (step, row) in enumerate(zip(raw["steps"], summary["steps"], strict=True)):
        teacher = f"{step['teacher']['train_s']:.0f}" + (" (the step before's)"
                                                        if step["teacher_shared"] else "")
        saving = "-" if row["saving_s"] is None else f"{row['saving_s']:.0f}"
        share = "-" if row["share"] is None else f"{row['share']:.0%}"
        cache = f"{step['cache_s']:.0f}" if step["cache_s"] else "-"
        head.append(f"| {i}. {step['step']} | {teacher} | {cache} | "
                    + " | ".join(f"{step['students'][n]['train_s']:.0f}" for n in names)
                    + f" | {row['pipeline_s']:.0f} | {row['of_today']:.0%} | {saving} | "
                    f"{share} | " + accuracies(step, names) + " |")
    return head + [kdscale_ablation_row(results, names)]


def accuracies(step: dict, names: list[str]) -> str:
    models = [step["teacher"]] + [step["students"][n] for n in names]
    dev = " / ".join(f"{m['accuracy']:.4f}" for m in models)
    return dev + " | " + " / ".join(f"{m['test']['accuracy']:.4f}" for m in models)


def kdscale_ablation_row(results: dict, names: list[str]) -> str:
    kd, summary = results["kdscale"], results["summary"]
    students = summary["kdscale"]["students"]
    mine = summary["ablation"]["kdscale"]
    dev = " / ".join([f"{kd['teacher']['accuracy']:.4f}"]
                     + [f"{students[n]['kd']['accuracy']['mean']:.4f}" for n in names])
    test = " / ".join([f"{kd['teacher']['test']['accuracy']:.4f}"]
                      + [f"{students[n]['kd']['test_accuracy']['mean']:.4f}" for n in names])
    return (f"| kdscale's pipeline (its own recipe) | {kd['teacher']['train_s']:.0f}"
            f" | {kd['cache_s']:.0f} | "
            + " | ".join(f"{students[n]['kd']['train_s']:.0f}" for n in names)
            + f" | {mine['pipeline_s']:.0f} | {mine['of_today']:.0%} | - | - | {dev} | {test} |")


def headline(results: dict) -> str:
    """The speed claim, naming the comparison each ratio is."""
    summary, s = results["summary"], results["settings"]
    if summary["baseline"] is None:
        return "No baseline in this run: no speed comparison."
    ratio = summary["kdscale"]["pipeline_s"] / summary["baseline"]["pipeline_s"]
    text = (f"**Headline.** kdscale's pipeline takes {ratio:.0%} of the wall time of the "
            f"baseline as users run it today (inputs padded to {s['baseline']['max_length']} "
            f"tokens, torch's default AdamW, embeddings trained, teacher online), students of "
            f"{seeds_text(s['seeds'])}: kdscale's engineering and its cache together.")
    ablation = summary["ablation"]
    if ablation is None or len(ablation["steps"]) < 2:
        return text + " No ablation in this run: the cache's own share is not measured."
    before, last = ablation["steps"][-2], ablation["steps"][-1]
    share = "none" if last["share"] is None else f"{last['share']:.0%}"
    return text + (
        f" Taken apart on the plain recipe (seed {ablation['seed']}, one seed): the "
        f"engineering without the cache brings it to {before['of_today']:.0%} of its time, "
        f"the last step (\"{last['step']}\") to {last['of_today']:.0%}: {share} of the "
        f"saving from step 0. Against the plain recipe with the same "
        f"engineering and no cache (step {len(ablation['steps']) - 2}), kdscale's pipeline "
        f"takes {ablation['kdscale']['of_step_before_last']:.0%}.")


def ablation_section(results: dict) -> list[str]:
    if results["ablation"] is None:
        return []
    summary = results["summary"]["ablation"]
    return ["## The speed figure taken apart", "",
            f"One seed (seed {summary['seed']}): no spread. Each step keeps the steps before "
            f"it and trains with the baseline's recipe (rows, epochs, T, alpha, the first K "
            f"layers), so only the engineering differs; step 0 is the baseline side's own run "
            f"of that seed. The shares add up to 100% of the {summary['total_saving_s']:.0f} s "
            f"saved from step 0 to the last step.", "", *ablation_rows(results), "",
            kdscale_recipe(results), ""]


def goal_rows(results: dict) -> list[str]:
    met = {True: "yes", False: "no", None: "n/a (one seed)"}
    return [f"| {g['goal']} | {g['split']} | {g['measured']} | {met[g['met']]} |"
            for g in results["summary"]["goals"]]


def intro(results: dict) -> str:
    s, test = results["settings"], results["test"]
    sides = "on both sides" if results["baseline"] else "of every model"
    extra = transfer_rows_text(results)
    note = (f" (+ {extra} that the teacher labels, for the KD students; their step-matched "
            f"controls read the labelled rows alone)") if extra else ""
    return (f"{results['device']} ({results['torch_threads']} threads), {s['precision']} "
            f"training {sides} (evaluation in fp32); {results['train_rows']} labelled "
            f"training rows{note}; {results['dev']['examples']} dev rows and "
            f"{test['examples']} test rows (of the {test['held_out']} held out of train.tsv: "
            f"stratified by label, seed {s['test_split']['seed']}, never trained or tuned on), "
            f"the same rows for every model; students of {seeds_text(s['seeds'])}; whole "
            f"benchmark {results['total_s'] / 60:.1f} min.")


def markdown(results: dict) -> str:
    against = "against the plain recipe" if results["baseline"] else "(no baseline in this run)"
    spread = "one seed" if len(results["settings"]["seeds"]) == 1 else "mean ± std, min-max"
    lines = [f"# SST-2: kdscale {against}", "", intro(results), "", source_line(results), "",
             headline(results), "",
             f"| model | teacher layers | steps | dev accuracy ({spread}) | test accuracy | "
             "retention dev / test | parameters | latency/batch (ms) | speedup |",
             "|---|---|---|---|---|---|---|---|---|", *model_rows(results), "",
             "| wall time (s) | kdscale | baseline |", "|---|---|---|", *time_rows(results), "",
             f"Cache on disk: {size(results['kdscale']['cache_bytes'])} "
             f"({results['kdscale']['cache_bytes'] / results['transfer_rows']:.0f} bytes per "
             f"row).", "", *lever_section(results), *ablation_section(results),
             "| goal | split | measured | met |", "|---|---|---|---|", *goal_rows(results), "",
             "![accuracy, wall time and latency](sst2_bench.png)", ""]
    return "\n".join(lines)

"""report.md's table of the accuracy levers, each alone against kdscale's recipe."""

from __future__ import annotations


def mean_sd(s: dict) -> str:
    return f"{s['mean']:.4f}" if s["std"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"


def lever_cells(students: dict, gains: dict | None, sizes: list[str]) -> str:
    cells = []
    for size in sizes:
        s = students[size]
        for split, key in (("dev", "accuracy"), ("test", "test_accuracy")):
            gain = "" if gains is None else f" ({gains[size][split] * 100:+.2f})"
            cells.append(mean_sd(s[key]) + gain)
        cells.append(f"{s['retention']['mean']:.1%} / {s['test_retention']['mean']:.1%}")
    return " | ".join(cells)


def lever_section(results: dict) -> list[str]:
    levers = results["summary"].get("levers")
    if not levers:
        return []
    recipe = results["summary"]["kdscale"]["students"]
    sizes = list(recipe)
    teacher = results["kdscale"]["teacher"]
    head = " | ".join(f"{size} dev | {size} test | {size} retention dev / test"
                      for size in sizes)
    rows = [f"| kdscale's recipe (the main comparison's KD students) | "
            f"{teacher['accuracy']:.4f} / {teacher['test']['accuracy']:.4f} | "
            f"{lever_cells({n: recipe[n]['kd'] for n in sizes}, None, sizes)} |"]
    for name, lever in levers.items():
        own = " (its own)" if lever["teacher"]["own"] else ""
        rows.append(f"| {name} | {lever['teacher']['accuracy']:.4f} / "
                    f"{lever['teacher']['test_accuracy']:.4f}{own} | "
                    f"{lever_cells(lever['students'], lever['gain'], sizes)} |")
    seeds = results["settings"]["seeds"]
    return ["## Each accuracy lever alone", "",
            f"Each lever is laid alone over kdscale's recipe and trains the KD students of "
            f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))} from a "
            f"cache of its own; in brackets, the "
            f"difference of its mean from the recipe's, in points. Retention is of the teacher "
            f"the students learned from. The levers' keys are in `settings.levers`.", "",
            f"| lever | teacher dev / test | {head} |",
            "|---|---|" + "---|" * 3 * len(sizes), *rows, ""]

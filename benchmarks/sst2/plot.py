"""sst2_bench.png: dev and test accuracy of every model, the pipelines' wall time by stage (the
ablation's steps and kdscale's pipeline, or the two sides where there is no ablation), and
inference latency."""

from __future__ import annotations

from pathlib import Path

PALETTE = ["#55a868", "#c44e52", "#dd8452", "#937860", "#da8bc3"]
STAGE_COLORS = {"teacher": "#4c72b0", "cache": "#8172b3"}  # students: PALETTE in order


def accuracy_panel(ax, results: dict) -> None:
    labels, dev, errs, test = [], [], [], []
    for side in ("kdscale", "baseline"):
        if results[side] is None:
            continue
        labels.append(f"{side}\nteacher")
        dev.append(results[side]["teacher"]["accuracy"])
        errs.append(0.0)
        test.append(results[side]["teacher"]["test"]["accuracy"])
        for name, kinds in results["summary"][side]["students"].items():
            for kind, s in kinds.items():
                labels.append(f"{side}\n{name} {kind}")
                dev.append(s["accuracy"]["mean"])
                errs.append(s["accuracy"]["std"] or 0.0)  # one seed: no error bar
                test.append(s["test_accuracy"]["mean"])
    x = range(len(dev))
    ax.bar([i - 0.2 for i in x], dev, 0.4, yerr=errs, capsize=2, color="#4c72b0", label="dev")
    ax.bar([i + 0.2 for i in x], test, 0.4, color="#dd8452", label="held-out test")
    ax.set_xticks(list(x), labels, fontsize=6, rotation=60, ha="right")
    ax.set(ylim=(min(dev + test) - 0.05, 1.0), ylabel="accuracy (mean; dev: ± std over seeds)",
           title="Dev and held-out test accuracy")
    ax.legend(fontsize=7)


def pipelines(results: dict) -> list[tuple[str, list[tuple[str, float]]]]:
    """(bar label, [(stage, seconds)]) per pipeline: the ablation's steps and kdscale's, or
    the two sides."""
    summary = results["summary"]
    kdscale = [("teacher", results["kdscale"]["teacher"]["train_s"]),
               ("cache", results["kdscale"]["cache_s"])]
    kdscale += [(n, k["kd"]["train_s"]) for n, k in summary["kdscale"]["students"].items()]
    bars = []
    if results["ablation"] is not None:
        for i, step in enumerate(results["ablation"]["steps"]):
            stages = [("teacher", step["teacher"]["train_s"]), ("cache", step["cache_s"])]
            stages += [(n, run["train_s"]) for n, run in step["students"].items()]
            bars.append((f"step {i}", stages))
    elif results["baseline"] is not None:
        stages = [("teacher", results["baseline"]["teacher"]["train_s"])]
        stages += [(n, k["kd"]["train_s"]) for n, k in summary["baseline"]["students"].items()]
        bars.append(("baseline", stages))
    return bars + [("kdscale", kdscale)]


def wall_panel(ax, results: dict) -> None:
    bars = pipelines(results)
    colors = dict(STAGE_COLORS)
    for name in results["summary"]["kdscale"]["students"]:
        colors.setdefault(name, PALETTE[(len(colors) - 2) % len(PALETTE)])
    labelled = set()
    for i, (_, stages) in enumerate(bars):
        bottom = 0.0
        for stage, seconds in stages:
            ax.bar(i, seconds / 60, bottom=bottom, color=colors.get(stage, "#999999"),
                   label=None if stage in labelled else stage)
            labelled.add(stage)
            bottom += seconds / 60
    ax.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax.legend(fontsize=7)
    title = ("Pipeline wall time: the ablation's steps (one seed) and kdscale"
             if results["ablation"] is not None else "Pipeline wall time")
    ax.set(ylabel="minutes", title=title)


def latency_panel(ax, results: dict) -> None:
    students = results["summary"]["kdscale"]["students"]
    values = [results["kdscale"]["teacher"]["latency_ms"]]
    values += [kinds["kd"]["latency_ms"] for kinds in students.values()]
    ax.bar(["teacher", *students], values, color="#55a868")
    for i, v in enumerate(values):
        ax.text(i, v, f"{values[0] / v:.1f}x", ha="center", va="bottom")
    ax.set(ylabel="ms per dev batch", title="Inference latency (speedup vs teacher)")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (acc, wall, lat) = plt.subplots(1, 3, figsize=(17, 5))
    accuracy_panel(acc, results)
    wall_panel(wall, results)
    latency_panel(lat, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

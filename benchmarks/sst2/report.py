"""The SST-2 benchmark's results: the JSON, report.md and a plot of accuracy, time and speed.

Spread over seeds is the sample standard deviation and the min-max range; one dev row is
1/872 = 0.11 points. Pipeline wall time = teacher fine-tune (+ cache, kdscale) + one run of
each KD student (the mean over seeds): what it takes to produce the three models once.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks.provenance import provenance
from kdscale.commands.report import device_name


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values), "n": len(values)}


def summarize_runs(runs: list[dict], teacher: dict) -> dict:
    accuracy = [r["accuracy"] for r in runs]
    return {"accuracy": spread(accuracy),
            "retention": spread([a / teacher["accuracy"] for a in accuracy]),
            "params": runs[0]["params"], "layers": runs[0]["layers"],
            "latency_ms": statistics.fmean(r["latency_ms"] for r in runs),
            "speedup": teacher["latency_ms"] / statistics.fmean(r["latency_ms"] for r in runs),
            "train_s": statistics.fmean(r["train_s"] for r in runs)}


def summarize_side(side: dict) -> dict:
    students = {name: {kind: summarize_runs(runs, side["teacher"]) for kind, runs in kinds.items()}
                for name, kinds in side["students"].items()}
    pipeline = side["teacher"]["train_s"] + side.get("cache_s", 0.0)
    pipeline += sum(kinds["kd"]["train_s"] for kinds in students.values())
    return {"students": students, "pipeline_s": pipeline}


def goals(settings: dict, kd: dict, base: dict | None, total_s: float) -> list[dict]:
    rows = []
    for name, spec in settings["students"].items():
        ours = kd["students"][name]
        retention = ours["kd"]["retention"]["mean"]
        rows.append({"goal": f"{name} KD student keeps >= {spec['retention_goal']:.0%} of the "
                     f"teacher", "measured": f"{retention:.2%}",
                     "met": retention >= spec["retention_goal"]})
        hard, soft = ours["hard"]["accuracy"]["mean"], ours["kd"]["accuracy"]["mean"]
        rows.append({"goal": f"{name} KD student beats the hard-label student",
                     "measured": f"{soft:.4f} vs {hard:.4f}", "met": soft > hard})
    if base is not None:
        ratio = kd["pipeline_s"] / base["pipeline_s"]
        equal = all(kd["students"][n]["kd"]["accuracy"]["mean"]
                    >= base["students"][n]["kd"]["accuracy"]["mean"] for n in settings["students"])
        limit = settings["goals"]["speed_ratio"]
        rows.append({"goal": f"kdscale pipeline <= {limit:.0%} of the baseline's wall time, "
                     f"at equal or better accuracy", "measured": f"{ratio:.0%}, accuracy "
                     f"{'equal or better' if equal else 'lower'}", "met": ratio <= limit and equal})
    if settings["max_train_examples"] is None:  # --full: the time goal is the subset's
        return rows
    minutes = settings["goals"]["total_minutes"]
    rows.append({"goal": f"whole benchmark under {minutes} minutes", "measured":
                 f"{total_s / 60:.1f} min", "met": total_s <= minutes * 60})
    return rows


def build(settings: dict, dev_rows: dict, kd_side: dict, base_side: dict | None,
          total_s: float) -> dict:
    kd = summarize_side(kd_side)
    base = summarize_side(base_side) if base_side else None
    return {"device": device_name(), **provenance(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "eval_device": "cpu",
            "cuda": torch.cuda.is_available(), "total_s": round(total_s, 1), "dev": dev_rows,
            "train_rows": kd_side["train_rows"], "transfer_rows": kd_side["transfer_rows"],
            "settings": settings, "summary": {"kdscale": kd, "baseline": base,
                                              "goals": goals(settings, kd, base, total_s)},
            "kdscale": kd_side, "baseline": base_side}


def size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def fmt_acc(s: dict) -> str:
    if s.get("n", 2) == 1:  # no spread to show from one seed
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
    return f"Measured at commit {commit[:10]}, {tree}."


def model_rows(results: dict) -> list[str]:
    rows = []
    for side in ("kdscale", "baseline"):
        raw, summary = results[side], results["summary"][side]
        if raw is None:
            continue
        t = raw["teacher"]
        rows.append(f"| {side} teacher | 6 | {t['accuracy']:.4f} | 100% | {t['params']:,} | "
                    f"{t['latency_ms']:.1f} | 1.0x |")
        for name, kinds in summary["students"].items():
            for kind, s in kinds.items():
                label = "KD" if kind == "kd" else "hard labels"
                rows.append(f"| {side} {name} {label} | {s['layers']} | {fmt_acc(s['accuracy'])}"
                            f" | {s['retention']['mean']:.1%} | {s['params']:,} | "
                            f"{s['latency_ms']:.1f} | {s['speedup']:.1f}x |")
    return rows


def time_rows(results: dict) -> list[str]:
    kd, base = results["kdscale"], results["baseline"]
    summary = results["summary"]
    names = list(summary["kdscale"]["students"])
    lines = [f"| teacher fine-tune | {kd['teacher']['train_s']:.0f} | "
             f"{base['teacher']['train_s']:.0f} |" if base else
             f"| teacher fine-tune | {kd['teacher']['train_s']:.0f} | - |",
             f"| cache (once) | {kd['cache_s']:.0f} | - |"]
    for n in names:
        b = summary["baseline"]["students"][n]["kd"]["train_s"] if base else None
        lines.append(f"| {n} KD student | {summary['kdscale']['students'][n]['kd']['train_s']:.0f}"
                     f" | {'-' if b is None else f'{b:.0f}'} |")
    b = summary["baseline"]["pipeline_s"] if base else None
    lines.append(f"| **pipeline** | **{summary['kdscale']['pipeline_s']:.0f}** | "
                 f"**{'-' if b is None else f'{b:.0f}'}** |")
    return lines


def copies_note(results: dict) -> str:
    copies = results["transfer_rows"] - results["train_rows"]
    return (f" (+ {copies} augmented copies that the teacher labels, for the KD students; "
            f"the hard-label students read the labelled rows alone)") if copies else ""


def spread_header(settings: dict) -> str:
    return "one seed" if len(settings["seeds"]) == 1 else "mean ± std, min-max"


def markdown(results: dict) -> str:
    s = results["settings"]
    against = "against the plain recipe" if results["baseline"] else "(no baseline in this run)"
    sides = "on both sides" if results["baseline"] else "of every model"
    lines = [f"# SST-2: kdscale {against}", "",
             f"{results['device']} ({results['torch_threads']} threads), {s['precision']} "
             f"training {sides} (evaluation in fp32); "
             f"{results['train_rows']} labelled training rows"
             f"{copies_note(results)}, {results['dev']['examples']} dev rows "
             f"(the same rows for every model); "
             f"student seeds {s['seeds']}; whole benchmark {results['total_s'] / 60:.1f} min.",
             "", source_line(results),
             "", f"| model | layers | dev accuracy ({spread_header(s)}) | retention | "
             "parameters | latency/batch (ms) | speedup |", "|---|---|---|---|---|---|---|",
             *model_rows(results), "", "| wall time (s) | kdscale | baseline |", "|---|---|---|",
             *time_rows(results), "",
             f"Cache on disk: {size(results['kdscale']['cache_bytes'])} "
             f"({results['kdscale']['cache_bytes'] / results['transfer_rows']:.0f} bytes per "
             f"row).", "",
             "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |"
              for g in results["summary"]["goals"]]
    lines += ["", "![accuracy, wall time and latency](sst2_bench.png)", ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "sst2_bench.png")
    print(markdown(results))
    print(f"results written to {out}/results.json, report.md, sst2_bench.png")


STAGE_COLORS = {"teacher": "#4c72b0", "cache": "#8172b3", "3-layer": "#55a868",
                "2-layer": "#c44e52"}


def stages(results: dict, side: dict) -> list[tuple[str, float]]:
    out = [("teacher", results[side]["teacher"]["train_s"])]
    if "cache_s" in results[side]:
        out.append(("cache", results[side]["cache_s"]))
    for name, kinds in results["summary"][side]["students"].items():
        out.append((name, kinds["kd"]["train_s"]))
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (acc, wall, lat) = plt.subplots(1, 3, figsize=(15, 4.5))
    sides = [s for s in ("kdscale", "baseline") if results[s] is not None]
    labels, means, errs = [], [], []
    for side in sides:
        labels.append(f"{side}\nteacher")
        means.append(results[side]["teacher"]["accuracy"])
        errs.append(0.0)
        for name, kinds in results["summary"][side]["students"].items():
            for kind, s in kinds.items():
                labels.append(f"{side}\n{name} {kind}")
                means.append(s["accuracy"]["mean"])
                errs.append(s["accuracy"]["std"])
    acc.bar(range(len(means)), means, yerr=errs, capsize=3,
            color=["#4c72b0" if lab.startswith("kdscale") else "#dd8452" for lab in labels])
    acc.set_xticks(range(len(means)), labels, fontsize=7, rotation=45, ha="right")
    acc.set(ylim=(min(means) - 0.05, 1.0), ylabel="dev accuracy (mean ± std over seeds)",
            title="Dev accuracy")
    for i, side in enumerate(sides):  # one stacked bar per side, a segment per stage
        bottom = 0.0
        for stage, seconds in stages(results, side):
            wall.bar(i, seconds / 60, bottom=bottom, color=STAGE_COLORS[stage],
                     label=stage if i == 0 else None)  # kdscale's bar has every stage
            bottom += seconds / 60
    wall.set_xticks(range(len(sides)), sides)
    wall.legend()
    wall.set(ylabel="minutes", title="Pipeline wall time (teacher + cache + both students)")
    names = list(results["summary"]["kdscale"]["students"])
    lat_values = [results["kdscale"]["teacher"]["latency_ms"]] + [
        results["summary"]["kdscale"]["students"][n]["kd"]["latency_ms"] for n in names]
    lat.bar(["teacher"] + names, lat_values, color="#55a868")
    for i, v in enumerate(lat_values):
        lat.text(i, v, f"{lat_values[0] / v:.1f}x", ha="center", va="bottom")
    lat.set(ylabel="ms per dev batch", title="Inference latency (speedup vs teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

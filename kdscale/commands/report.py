"""The teacher-vs-student report: a table on the terminal, report.json, report.md and a plot."""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

import torch

from kdscale.config import Config, to_dict
from kdscale.files import OutputError, write_files_atomic
from kdscale.train.periodic_eval import best_eval
from kdscale.train.timing import PHASES, overall_breakdown

# Every metric a task reports (a table shows those its models have), then size and speed.
COLUMNS = [("accuracy", "accuracy", "{:.4f}"), ("f1", "F1", "{:.4f}"),
           ("exact_match", "exact match", "{:.4f}"),
           ("entity_f1", "entity F1", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
           ("next_sentence_accuracy", "next-sentence accuracy", "{:.4f}"),
           ("params", "parameters", "{:,}"), ("layers", "layers", "{}"),
           ("latency_ms", "latency/batch (ms)", "{:.2f}")]


def read_history(model_dir: Path) -> list[dict]:
    path = model_dir / "training_log.json"
    return json.loads(path.read_text()) if path.is_file() else []


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the CPU model here; platform does not
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_report(config: Config, results: dict[str, dict], metric: str = "accuracy") -> dict:
    """`metric`: the task's headline metric, the one retention compares."""
    teacher, student = results["teacher"], results["student"]
    history = {"teacher": read_history(config.teacher_dir),
               "student": read_history(config.student_dir)}
    return {
        "teacher": teacher,
        "student": student,
        "metric": metric,
        "retention": student[metric] / teacher[metric] if teacher[metric] else 0.0,
        "speedup": teacher["latency_ms"] / student["latency_ms"],
        "compression": teacher["params"] / student["params"],
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "history": history,
        "step_time_ms": {name: overall_breakdown(h) for name, h in history.items()},
        "best_eval": best_eval(history["student"]),
        "config": to_dict(config),
    }


def breakdown_lines(report: dict) -> list[str]:
    """A markdown table of the mean step time per phase of each training run."""
    runs = {name: t for name, t in report["step_time_ms"].items() if t}
    if not runs:
        return []
    lines = ["| step time (ms) | " + " | ".join(PHASES) + " | total |",
             "|" + "---|" * (len(PHASES) + 2)]
    for name, times in runs.items():
        task = "teacher fine-tune" if name == "teacher" else "student distill"
        lines.append(f"| {task} | " + " | ".join(f"{times[p]:.1f}" for p in PHASES)
                     + f" | {times['step']:.1f} |")
    return ["", *lines]


def table_rows(report: dict) -> list[list[str]]:
    columns = [c for c in COLUMNS if c[0] in report["teacher"] or c[0] in report["student"]]
    rows = [["model"] + [title for _, title, _ in columns]]
    for name in ("teacher", "student"):
        metrics = report[name]
        rows.append([name] + [fmt.format(metrics[key]) if key in metrics else "-"
                              for key, _, fmt in columns])
    return rows


def metric_title(report: dict) -> str:
    key = report.get("metric", "accuracy")
    return next((title for name, title, _ in COLUMNS if name == key), key)


def summary_line(report: dict) -> str:
    return (f"retention {report['retention']:.1%} of the teacher's {metric_title(report)} with "
            f"{report['compression']:.1f}x fewer parameters, {report['speedup']:.1f}x faster")


def print_table(report: dict) -> None:
    rows = table_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(summary_line(report))


def markdown(report: dict) -> str:
    rows = table_rows(report)
    lines = ["# kdscale report", "", "| " + " | ".join(rows[0]) + " |",
             "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    batch = report["config"]["eval"]["batch_size"]
    lines += ["", summary_line(report) + ".", "",
              f"Latency: median forward time of one eval batch of {batch} on "
              f"{report['device']} ({report['torch_threads']} threads)."]
    best = report["best_eval"]
    if best:
        lines += ["", f"Best evaluation during distillation: accuracy {best['eval_accuracy']:.4f}"
                  f" at step {best['step']} (saved in student_best/)."]
    lines += breakdown_lines(report)
    lines += ["", "![training curves and accuracy](report.png)", ""]
    return "\n".join(lines)


def write_report(report: dict, output_dir: str | Path) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    plot(report, image)
    files = {output_dir / "report.json": json.dumps(report, indent=1).encode(),
             output_dir / "report.md": markdown(report).encode(),
             output_dir / "report.png": image.getvalue()}
    try:
        write_files_atomic(files)  # all three or none: the previous report stays whole
    except OSError as err:
        raise OutputError(f"could not write the report in {output_dir}: {err.strerror or err} "
                          f"(is the disk full?); the previous report is kept") from None
    print(f"report written to {output_dir}/report.{{json,md,png}}")


def plot(report: dict, path) -> None:
    """Training curves and the accuracy comparison, as PNG, to a path or a binary file."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("teacher", "-"), ("student", "--")):
        history = [r for r in report["history"][name] if "loss" in r]  # not eval records
        if history:
            curves.plot([h["step"] for h in history], [h["loss"] for h in history], style,
                        label=f"{name} ({'fine-tune, CE' if name == 'teacher' else 'distill, KD'})")
    curves.set(xlabel="optimizer step", ylabel="training loss", title="Training curves")
    curves.legend()
    names = ["teacher", "student"]
    scores = [report[n][report.get("metric", "accuracy")] for n in names]
    bars.bar(names, scores, color=["#4c72b0", "#dd8452"])
    for i, score in enumerate(scores):
        bars.text(i, score, f"{score:.3f}", ha="center", va="bottom")
    title = metric_title(report)
    bars.set(ylim=(0, 1.05), ylabel=f"eval {title}",
             title=f"{title[0].upper()}{title[1:]} (retention {report['retention']:.1%})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

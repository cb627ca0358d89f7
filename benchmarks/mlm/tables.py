"""report.md of the MLM benchmark: the students per kind over seeds, the bytes per position,
the caches' audits, the goals, the top-k truncation and the wall times."""

from __future__ import annotations

from benchmarks.sst2.tables import source_line

LABELS = {"dense": "dense KD (every logit)", "topk": "top-k KD", "topk_tail": "top-k + tail KD",
          "sampled": "sampled KD", "labels": "MLM labels alone"}


def label(name: str) -> str:
    return LABELS.get(name, name)


def audit_key(cache: dict) -> str:
    """Which of the audit's ways of storing the teacher is this cache's own."""
    if cache["stored_as"] == "sampled":
        return "sampled"
    return "topk_tail" if cache["tail"] else "topk"


def fmt(s: dict, digits: int) -> str:
    if s["std"] is None:  # one seed: no spread to show
        return f"{s['mean']:.{digits}f} (n = 1)"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n = {s['n']}, "
            f"{s['min']:.{digits}f}-{s['max']:.{digits}f})")


def header(r: dict) -> list[str]:
    sentences = r["settings"]["experiment"]["data"]["max_train_examples"]
    return ["# Masked-LM distillation on SST-2 sentences: which cache to keep", "",
            f"Device: {r['device']} ({r['torch_threads']} threads); whole run "
            f"{r['times']['total_s'] / 60:.1f} min. {source_line(r)}", "",
            f"Every student: 3 layers, the same {f'{sentences:,}' if sentences else 'all the'} "
            f"training sentences and steps, seeds {', '.join(map(str, r['settings']['seeds']))}"
            f"; the teacher and the caches built once. Held-out masked tokens: "
            f"{r['teacher']['masked_tokens']:,} in {r['teacher']['examples']:,} dev sentences.",
            ""]


def student_rows(r: dict) -> list[str]:
    t = r["teacher"]
    lines = ["| model | k | masked-token accuracy | perplexity | steps | train s (mean) |",
             "|---|---|---|---|---|---|",
             f"| teacher, 6 layers | - | {t['accuracy']:.4f} | {t['perplexity']:.1f} | - | "
             f"{r['times']['finetune']:.0f} |"]
    for name, s in r["summary"].items():
        k = r["caches"][name]["k"] if name in r["caches"] else "-"
        lines.append(f"| {label(name)} | {k} | {fmt(s['accuracy'], 4)} | "
                     f"{fmt(s['perplexity'], 1)} | {'/'.join(map(str, s['steps']))} | "
                     f"{s['train_s']:.0f} |")
    return lines


def byte_rows(r: dict) -> list[str]:
    lay = r["layout"]
    lines = [f"Bytes per masked position: budget {r['settings']['bytes_per_position']} for "
             f"{', '.join(label(n) for n in r['budget_kinds'])}, each with the most slots "
             f"that fit (so they differ by less than one slot). Measured layout: "
             f"{lay['slot']:g} bytes a slot, {lay['row']:g} a position's own fields, "
             f"{lay['tail']:g} a tail, {lay['example']:g} a sentence. On disk: the shard "
             f"files over the masked positions (with each sentence's fields and the headers).",
             "", "| kind | k | position's own bytes | on disk per position | cache | built (s) |",
             "|---|---|---|---|---|---|"]
    for name, c in r["caches"].items():
        lines.append(f"| {label(name)} | {c['k']:,} | {c['position_bytes']:,.0f} | "
                     f"{c['bytes_per_position']:,.1f} | {c['bytes'] / 2**20:,.2f} MiB | "
                     f"{c['seconds']:.0f} |")
    return lines


def audit_rows(r: dict) -> list[str]:
    lines = ["Audit (`kdscale cache`, in each manifest): against the full teacher, on the "
             "first rows, for a uniform student at the loss's temperature; each kind's own "
             "way of storing the teacher at its own k.", "",
             "| kind | k | rows | top-k mass | loss error | gradient error |",
             "|---|---|---|---|---|---|"]
    for name, c in r["caches"].items():
        audit = c["audit"]
        if audit is None:  # k = vocabulary: nothing left out, nothing to audit
            lines.append(f"| {label(name)} | {c['k']:,} | - | 100% | - (every logit) | - |")
            continue
        own = audit[audit_key(c)]
        lines.append(f"| {label(name)} | {audit['k']} | {audit['rows']} | "
                     f"{audit['mass_covered']:.1%} | {own['loss_error']:.1%} | "
                     f"{own['grad_error']:.1%} |")
    return lines


def goal_rows(r: dict) -> list[str]:
    marks = {True: "met", False: "missed", None: "-"}
    lines = ["| goal | measured | |", "|---|---|---|"]
    return lines + [f"| {g['goal']} | {g['measured']} | {marks[g['met']]} |" for g in r["goals"]]


def truncation_rows(r: dict) -> list[str]:
    if not r["truncation"]:
        return ["Top-k truncation: not measured this run."]
    lines = ["Top-k truncation, on the held-out masked positions with the first seed's top-k "
             "student: the soft loss T^2 KL from the teacher's top k logits against the full "
             "teacher.", "", "| k | bytes/position | soft loss, top-k | soft loss, full | "
             "relative error | teacher mass in top k |", "|---|---|---|---|---|---|"]
    return lines + [f"| {t['k']} | {t['bytes_per_position']} | {t['soft_loss_topk']:.4f} | "
                    f"{t['soft_loss_full']:.4f} | "
                    f"{t['relative_error']:+.2%} | {t['teacher_mass']:.4f} |"
                    for t in r["truncation"]]


def time_rows(r: dict) -> list[str]:
    times = r["times"]
    rows = [("teacher fine-tune", times["finetune"]), ("layout probe", times["probe"])]
    rows += [(f"cache, {label(n)}", s) for n, s in times["caches"].items()]
    rows += [(f"students, {label(n)} (all seeds)", s) for n, s in times["students"].items()]
    rows += [("scoring", times["scoring"]), ("truncation", times["truncation"]),
             ("**whole run**", times["total_s"])]
    return ["| part | seconds |", "|---|---|"] + [f"| {n} | {s:.0f} |" for n, s in rows]


def markdown(r: dict) -> str:
    sections = [header(r), student_rows(r), [""], byte_rows(r), [""], audit_rows(r), [""],
                ["## Goals", ""], goal_rows(r), [""], truncation_rows(r), [""],
                ["## Wall time", ""], time_rows(r)]
    return "\n".join(line for section in sections for line in section) + "\n"

"""The comparison's three goals, from the students' summaries and the caches' audits.

- The best cached kind (the highest mean masked-token accuracy of the kinds at the byte
  budget) within `dense_points` points of dense KD: on the means; the spread of the
  difference is shown beside it.
- The best cached kind ahead of labels alone by more than `labels_margin_sds` standard
  deviations of a difference of two runs, sqrt(sd_a^2 + sd_b^2), from the seeds. With one
  seed there is no spread: the goal is neither met nor missed (`met` None).
- Sampled's gradient error below top-k's, from their caches' audits at equal bytes.

A goal whose kinds were not run has `met` None too. The best kind is picked on the same
held-out tokens it is scored on: with three kinds that flatters it a little.
"""

from __future__ import annotations

import math


def goal(name: str, text: str, measured: str, met: bool | None) -> dict:
    return {"name": name, "goal": text, "measured": measured, "met": met}


def best_cached(summary: dict, cached: list[str]) -> str | None:
    present = [name for name in cached if name in summary]
    return max(present, key=lambda name: summary[name]["accuracy"]["mean"], default=None)


def difference_sd(a: dict, b: dict) -> float | None:
    """The sd of one run of `a` minus one run of `b`; None with a single seed."""
    if a["std"] is None or b["std"] is None:
        return None
    return math.hypot(a["std"], b["std"])


def dense_goal(summary: dict, best: str | None, points: float) -> dict:
    text = f"best cached kind within {points:g} points of dense KD (masked-token accuracy)"
    if best is None or "dense" not in summary:
        return goal("dense", text, "not run", None)
    best_acc, dense = summary[best]["accuracy"], summary["dense"]["accuracy"]
    gap = 100 * (dense["mean"] - best_acc["mean"])
    sd = difference_sd(best_acc, dense)
    spread = "one seed" if sd is None else f"sd of the difference {100 * sd:.2f}"
    return goal("dense", text, f"{best}: {gap:+.2f} points behind dense ({spread})",
                gap <= points)


def labels_goal(summary: dict, best: str | None, sds: float) -> dict:
    text = (f"best cached kind ahead of labels alone by more than {sds:g} standard deviations "
            f"of the seeds")
    if best is None or "labels" not in summary:
        return goal("labels", text, "not run", None)
    best_acc, labels = summary[best]["accuracy"], summary["labels"]["accuracy"]
    margin = best_acc["mean"] - labels["mean"]
    sd = difference_sd(best_acc, labels)
    if sd is None:
        return goal("labels", text, f"{best}: {margin:+.4f}; one seed: no spread to compare "
                    f"with", None)
    return goal("labels", text, f"{best}: {margin:+.4f} against {sds:g} x {sd:.4f} = "
                f"{sds * sd:.4f}", margin > sds * sd)


def gradient_goal(caches: dict) -> dict:
    text = "sampled's gradient error below top-k's at equal bytes (audits, uniform student)"
    audits = {name: (caches.get(name) or {}).get("audit") for name in ("sampled", "topk")}
    if None in audits.values():
        return goal("gradient", text, "not run", None)
    sampled, topk = audits["sampled"]["sampled"], audits["topk"]["topk"]
    bytes_text = " and ".join(f"{caches[n]['position_bytes']:.0f}" for n in ("sampled", "topk"))
    return goal("gradient", text, f"{sampled['grad_error']:.1%} against "
                f"{topk['grad_error']:.1%} ({bytes_text} bytes a position)",
                sampled["grad_error"] < topk["grad_error"])


def goals(settings: dict, summary: dict, caches: dict, cached: list[str]) -> list[dict]:
    spec = settings["goals"]
    best = best_cached(summary, cached)
    return [dense_goal(summary, best, spec["dense_points"]),
            labels_goal(summary, best, spec["labels_margin_sds"]), gradient_goal(caches)]

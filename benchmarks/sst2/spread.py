"""How far two runs of the SST-2 benchmark move apart, model by model and seed by seed: a rerun
(bit-identical on one machine), another precision, another CPU.

    python -m benchmarks.sst2.spread A/results.json B/results.json [--out spread.md]

Each model both runs trained (same side, size, kind and seed) is set beside its twin; the
table gives the largest and mean difference of dev and test accuracy, in dev or test rows,
and the seeds' own spread of A for scale: a difference within it is what another seed does.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def models(results: dict) -> dict:
    """(side, model, kind) -> {seed: (dev accuracy, test accuracy)}; teachers have seed None."""
    out = {}
    for side in ("kdscale", "baseline"):
        record = results.get(side)
        if not record:
            continue
        teacher = record["teacher"]
        out[(side, "teacher", "")] = {None: (teacher["accuracy"], teacher["test"]["accuracy"])}
        for name, kinds in record["students"].items():
            for kind, runs in kinds.items():
                out[(side, name, kind)] = {r["seed"]: (r["accuracy"], r["test"]["accuracy"])
                                           for r in runs}
    return out


def rows_moved(a: float, b: float, examples: int) -> int:
    return round(abs(a - b) * examples)


def compare(a: dict, b: dict) -> list[dict]:
    examples = (a["dev"]["examples"], a["test"]["examples"])
    if examples != (b["dev"]["examples"], b["test"]["examples"]) or \
            a["test"]["example_ids_sha256"] != b["test"]["example_ids_sha256"]:
        raise SystemExit("the two runs scored different dev or test rows: nothing to compare")
    ours, theirs = models(a), models(b)
    table = []
    for key in ours.keys() & theirs.keys():
        seeds = sorted(ours[key].keys() & theirs[key].keys(), key=str)
        moved = [[rows_moved(ours[key][s][i], theirs[key][s][i], examples[i]) for s in seeds]
                 for i in (0, 1)]
        own = [ours[key][s][0] for s in ours[key]]
        table.append({"model": " ".join(filter(None, key)), "seeds": len(seeds),
                      "dev_rows_max": max(moved[0]), "dev_rows_mean": statistics.fmean(moved[0]),
                      "test_rows_max": max(moved[1]), "test_rows_mean": statistics.fmean(moved[1]),
                      "identical": not any(moved[0] + moved[1]),
                      "seed_sd_dev_rows": (statistics.stdev(own) * examples[0]
                                           if len(own) > 1 else None)})
    return sorted(table, key=lambda row: row["model"])


def describe(results: dict) -> str:
    return (f"{results['device']}, {results['settings']['precision']}, commit "
            f"{results['commit'][:10]}")


def markdown(a: dict, b: dict, table: list[dict]) -> str:
    lines = [f"A: {describe(a)}. B: {describe(b)}. Differences of each model's accuracy between "
             f"the two runs, per seed, counted in rows (dev {a['dev']['examples']}, test "
             f"{a['test']['examples']}); the seeds' standard deviation in A, in dev rows, for "
             f"scale.", "",
             "| model | seeds | identical | dev rows moved: max / mean | test rows moved: "
             "max / mean | seeds' sd in A (dev rows) |", "|---|---|---|---|---|---|"]
    for r in table:
        sd = "-" if r["seed_sd_dev_rows"] is None else f"{r['seed_sd_dev_rows']:.1f}"
        lines.append(f"| {r['model']} | {r['seeds']} | {'yes' if r['identical'] else 'no'} | "
                     f"{r['dev_rows_max']} / {r['dev_rows_mean']:.1f} | "
                     f"{r['test_rows_max']} / {r['test_rows_mean']:.1f} | {sd} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path, help="write the table here too")
    args = p.parse_args(argv)
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    text = markdown(a, b, compare(a, b))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

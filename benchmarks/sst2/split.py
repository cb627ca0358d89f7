"""The held-out test split: rows of the training file that no training or tuning step sees.

GLUE's SST-2 test labels are not public and every setting of this benchmark was chosen on the
dev rows, so dev accuracy flatters the models. The benchmark holds out rows of train.tsv,
stratified by label and drawn by a seeded generator (the same rows on every machine), and
writes two files to its work folder: `train.tsv`, the rows left for training in their order,
and `test.tsv`, the held-out rows. Both sides read their training rows (and their first
`max_train_examples`, and the augmented copies made from them) from the first file only.

With `unlabelled_rows`, a third file, `unlabelled.tsv`: that many of the rows after the
labelled ones (the first `max_train_examples`), their text alone. kdscale's KD students read it
as `data.unlabelled_file`, text the teacher labels in the cache; no label of it is read.

A training row whose text equals a held-out row's (train.tsv repeats a few hundred phrases)
is left out of training too, so no held-out text is ever trained on. Each row keeps its
place in the source file in a `source_row` column (0: the first row after the header):
the ids the results hash, and what tests check the split by.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

SOURCE_ROW = "source_row"


@dataclass
class HeldOut:
    train_file: Path  # the rows left for training, in the source's order
    test_file: Path  # the held-out rows, in the source's order
    test_rows: list[int]  # their rows of the source file
    dropped_rows: list[int]  # training rows left out: their text is a held-out row's
    train_rows: int  # rows left for training

    def summary(self) -> dict:
        return {"held_out": len(self.test_rows), "train_rows_left": self.train_rows,
                "duplicates_dropped": len(self.dropped_rows)}


def ids_sha256(ids: list[int]) -> str:
    """The hash the results record for a set of evaluated rows (dev's and test's alike)."""
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def stratified_sample(labels: list[str], n: int, seed: int) -> list[int]:
    """`n` row indices, sorted; each label's count as close to its share of the rows as whole
    numbers allow (largest remainders first), the rows of a label drawn at random."""
    by_label: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        by_label.setdefault(label, []).append(row)
    exact = {label: n * len(rows) / len(labels) for label, rows in by_label.items()}
    counts = {label: int(share) for label, share in exact.items()}
    by_remainder = sorted(exact, key=lambda label: (counts[label] - exact[label], label))
    for label in by_remainder[:n - sum(counts.values())]:
        counts[label] += 1
    rng = random.Random(seed)
    picked = [row for label in sorted(by_label)
              for row in rng.sample(by_label[label], counts[label])]
    return sorted(picked)


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a tab-separated file, read without quote handling (as GLUE writes
    it and as both sides read it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line.strip()]


def write_tsv(path: Path, header: list[str], rows: list[list[str]], source_rows: list[int]):
    lines = ["\t".join([*header, SOURCE_ROW])]
    lines += ["\t".join([*row, str(source)]) for row, source in zip(rows, source_rows,
                                                                      strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def hold_out(source: Path, folder: Path, rows: int, seed: int, text_column: str,
             label_column: str) -> HeldOut:
    """Split `source` into folder/train.tsv and folder/test.tsv (see the module's text)."""
    header, table = read_tsv(source)
    text, label = header.index(text_column), header.index(label_column)
    if not 0 < rows < len(table):
        raise SystemExit(f"test_split.rows: {rows} of the {len(table)} rows of {source}; "
                         f"expected a number between 1 and {len(table) - 1}")
    test_rows = stratified_sample([row[label] for row in table], rows, seed)
    held_texts = {table[i][text] for i in test_rows}
    held = set(test_rows)
    dropped = [i for i in range(len(table)) if i not in held and table[i][text] in held_texts]
    left_out = held | set(dropped)
    kept = [i for i in range(len(table)) if i not in left_out]
    folder.mkdir(parents=True, exist_ok=True)
    split = HeldOut(folder / "train.tsv", folder / "test.tsv", test_rows, dropped, len(kept))
    write_tsv(split.train_file, header, [table[i] for i in kept], kept)
    write_tsv(split.test_file, header, [table[i] for i in test_rows], test_rows)
    return split


def write_unlabelled(split: HeldOut, labelled: int | None, rows: int, text_column: str,
                     path: Path | None = None) -> Path:
    """split.train_file's `rows` rows after its first `labelled`, text (and source row) only,
    to `path` (default: unlabelled.tsv beside it)."""
    if labelled is None or labelled + rows > split.train_rows:
        left = 0 if labelled is None else split.train_rows - labelled
        raise SystemExit(f"unlabelled_rows: {rows} rows after the {labelled or 'all'} labelled "
                         f"ones; the split leaves {left}")
    header, table = read_tsv(split.train_file)
    text, source = header.index(text_column), header.index(SOURCE_ROW)
    picked = table[labelled:labelled + rows]
    path = path or split.train_file.with_name("unlabelled.tsv")
    write_tsv(path, [text_column], [[row[text]] for row in picked],
              [int(row[source]) for row in picked])
    return path

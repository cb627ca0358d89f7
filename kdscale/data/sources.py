"""Reading a split: local files (csv, tsv, json, jsonl, parquet, txt) or a hub dataset, with a
stable `example_id` per row (the cache's key), checked before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from kdscale.config import DataConfig
from kdscale.errors import KdscaleError

# Extension -> (datasets builder, extra loader arguments). TSV is read without quote handling:
# GLUE's sentences contain bare quotes that a csv reader would swallow.
_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),  # raw text, one example per line, in a column named "text"
}


class DataError(KdscaleError):
    """Data that cannot be used as configured; the message names the file, column or key."""


def check_sources(cfg: DataConfig) -> None:
    """Fail fast on files or settings that cannot work, before any model is loaded."""
    if cfg.dataset is None and cfg.train_file is None:
        raise DataError("data: set data.train_file (a local file) or data.dataset (a hub name)")
    for key in ("train_file", "eval_file", "unlabelled_file"):
        path = getattr(cfg, key)
        if path is None:
            continue
        if Path(path).suffix not in _BUILDERS:
            raise DataError(f"data.{key}: {path} has extension {Path(path).suffix!r}; "
                            f"expected one of {sorted(_BUILDERS)}")
        if not Path(path).is_file():
            raise DataError(f"data.{key}: {_not_a_file(Path(path))}")
        if _is_empty(Path(path)):
            raise DataError(f"data.{key}: data file {path} has no rows")
        if Path(path).suffix == ".tsv":
            _check_tsv_fields(Path(path), key)
        columns = _peek_columns(Path(path), key)
        if columns is not None:
            renamed = [(cfg.rename_columns or {}).get(c, c) for c in columns]
            _check_columns(renamed, cfg, f"data file {path}",
                           labelled=key != "unlabelled_file")


def _not_a_file(path: Path) -> str:
    """Why `path` is not a readable file: a folder, a link that leads nowhere, or nothing."""
    if path.is_dir():
        return f"{path} is a folder; expected a data file"
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError) as err:  # RuntimeError: a loop, before Python 3.13
            reason = "a loop of links" if "loop" in str(err).lower() else "a broken link"
            return f"{path} is {reason}; expected a data file"
    return f"file {path} does not exist"


def _check_tsv_fields(path: Path, key: str) -> None:
    """Every line has the header's number of tab-separated fields. A .tsv is read without
    quoting (GLUE's sentences hold bare quotes), so a tab inside a quoted field splits it,
    and the rows after it would be read shifted."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        width = f.readline().count("\t") + 1
        bad = [n for n, line in enumerate(f, start=2)
               if line.strip() and line.rstrip("\r\n").count("\t") + 1 != width]
    if bad:
        raise DataError(f"data.{key}: line(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} of "
                        f"{path} ({len(bad)} in all) do not have the header's {width} "
                        f"tab-separated fields: a tab inside a field? A .tsv is read without "
                        f"quoting (as GLUE writes it), so quotes do not protect a tab; expected "
                        f"one tab between columns, or a .csv file")


def _is_empty(path: Path) -> bool:
    """No rows: an empty file, or a csv/tsv header alone (which `datasets` reports as an
    obscure 'corresponds to no data')."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_metadata(path).num_rows == 0
        except (OSError, ValueError):  # not parquet: load_raw names the file
            return False
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        lines = [line for line in (f.readline(), f.readline()) if line.strip()]
    return len(lines) < (2 if path.suffix in (".csv", ".tsv") else 1)


def _peek_columns(path: Path, key: str) -> list[str] | None:
    """Column names from a file's header or first record, without loading the file."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_schema(path).names
        except (pyarrow.ArrowException, OSError) as err:
            raise DataError(f"data.{key}: {path} cannot be read as parquet: "
                            f"{str(err).splitlines()[0]}") from None
    with path.open(encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's BOM
        first = f.readline().rstrip("\r\n")
    if path.suffix in (".csv", ".tsv"):
        return [c.strip().strip('"') for c in first.split("\t" if path.suffix == ".tsv" else ",")]
    try:  # jsonl (and .json written one record per line); a JSON array is checked on load
        record = json.loads(first)
    except json.JSONDecodeError:
        return None
    return list(record) if isinstance(record, dict) else None


def load_raw(cfg: DataConfig, split: str) -> datasets.Dataset:
    """Rows of one split ("train" or "eval") with an `example_id` column, columns checked."""
    check_sources(cfg)
    path = cfg.train_file if split == "train" else cfg.eval_file
    if path is not None:
        raw = _load_file(Path(path), split)
        where = f"data file {path}"
    elif cfg.dataset is not None:
        hub_split = cfg.train_split if split == "train" else cfg.eval_split
        raw = datasets.load_dataset(cfg.dataset, cfg.subset, split=hub_split)
        where = f"dataset {cfg.dataset}/{cfg.subset or ''} split {hub_split}"
    else:
        raise DataError(f"data: no {split} data; set data.{split}_file or data.dataset")
    raw = raw.rename_columns({k: v for k, v in (cfg.rename_columns or {}).items()
                              if k in raw.column_names})
    _check_columns(raw.column_names, cfg, where)
    if len(raw) == 0:
        raise DataError(f"{where} has no rows")
    # The id is the row's position in its source: stable across runs, processes and machines.
    raw = raw.add_column("example_id", list(range(len(raw))))
    _check_label_values(raw, cfg, where)
    limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    return raw.select(range(min(limit, len(raw)))) if limit else raw


def load_unlabelled(cfg: DataConfig) -> datasets.Dataset:
    """The text columns of `data.unlabelled_file` (renamed as the training file's), its
    first `data.max_unlabelled_examples` rows. The file itself was checked with the others
    by `check_sources`, which `load_raw` runs first."""
    path = Path(cfg.unlabelled_file)
    raw = _load_file(path, "unlabelled")
    raw = raw.rename_columns({k: v for k, v in (cfg.rename_columns or {}).items()
                              if k in raw.column_names})
    _check_columns(raw.column_names, cfg, f"data file {path}", labelled=False)
    if len(raw) == 0:
        raise DataError(f"data.unlabelled_file: data file {path} has no rows")
    texts = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    limit = cfg.max_unlabelled_examples
    return raw.select_columns(texts).select(range(min(limit or len(raw), len(raw))))


def _load_file(path: Path, split: str) -> datasets.Dataset:
    builder, kwargs = _BUILDERS[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data",
                                     **kwargs)
    except (ValueError, OSError, StopIteration, DatasetGenerationError) as err:
        # DatasetGenerationError says only that generation failed; its cause says why.
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"data.{split}_file: {path} cannot be read as {builder}: {text}") from err


def _check_label_values(raw: datasets.Dataset, cfg: DataConfig, where: str) -> None:
    """Every row has a label, and labels are class ids or names: a missing label would
    become a class of its own ('None', 'nan'), a fractional one a class per value."""
    column = cfg.label_column
    feature = raw.features.get(column)
    if type(feature).__name__ == "Json":  # `datasets` keeps a column of mixed types as JSON
        values = raw[column]
        number = next((v for v in values if isinstance(v, (int, float))), None)
        name = next((v for v in values if isinstance(v, str)), None)
        if number is not None and name is not None:
            raise DataError(f"data.label_column: {where} mixes label types ({number!r} and "
                            f"{name!r}); expected all class ids (integers) or all class names")
    if not isinstance(feature, datasets.Value):  # class ids, or a task's own labels (lists,
        return  # answers), which that task checks
    values = raw.unique(column)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        ids = [i for i, v in zip(raw["example_id"], raw[column], strict=True)
               if v is None or (isinstance(v, float) and math.isnan(v))]
        raise DataError(f"data.label_column: {len(ids)} row(s) of {where} have no "
                        f"{column!r} (example ids {ids[:5]}); expected a label in every row")
    fractional = [v for v in values if isinstance(v, float) and not v.is_integer()]
    if fractional:
        raise DataError(f"data.label_column: {where} has label {fractional[0]!r}; expected "
                        f"class ids (integers) or class names (a regression target cannot be "
                        f"distilled as classes)")


def _check_columns(columns: list[str], cfg: DataConfig, where: str,
                   labelled: bool = True) -> None:
    keys = ("text_column", "text_pair_column") + (("label_column",) if labelled else ())
    for key in keys:
        column = getattr(cfg, key)
        if column is not None and column not in columns:
            raise DataError(f"data.{key}: column {column!r} is not in {where}; "
                            f"its columns are {columns}")


def label_names_of(raw: datasets.Dataset, cfg: DataConfig) -> list[str]:
    """Class names: from a ClassLabel feature, else the sorted distinct values."""
    feature = raw.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = sorted(set(raw[cfg.label_column]))
    if all(isinstance(v, int) for v in values):
        if values[0] < 0:
            raise DataError(f"data.label_column: labels must be >= 0, found {values[0]}")
        return [str(i) for i in range(values[-1] + 1)]
    return [str(v) for v in values]

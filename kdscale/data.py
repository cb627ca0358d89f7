"""Task data through `datasets`: local files or a hub dataset, tokenized with the teacher's
tokenizer, with a stable `example_id` per example (the cache's key) and a fingerprint of the
processed data (the cache refuses data it was not built from)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets.exceptions import DatasetGenerationError

from kdscale.augment import COPY_COLUMN, NO_LABEL, with_copies
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
MODEL_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "example_id"]


class DataError(KdscaleError):
    """Data that cannot be used as configured; the message names the file, column or key."""


@dataclass
class TaskData:
    dataset: datasets.Dataset  # tokenized: MODEL_COLUMNS (token_type_ids where the model has them)
    label_names: list[str]
    fingerprint: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def rows(self, indices: list[int]) -> list[dict]:
        """Examples at these dataset positions, as a collator takes them (one columnar read)."""
        columns = self.dataset[indices]
        return [dict(zip(columns, values, strict=True))
                for values in zip(*columns.values(), strict=True)]


def check_sources(cfg: DataConfig) -> None:
    """Fail fast on files or settings that cannot work, before any model is loaded."""
    if cfg.dataset is None and cfg.train_file is None:
        raise DataError("data: set data.train_file (a local file) or data.dataset (a hub name)")
    for key in ("train_file", "eval_file"):
        path = getattr(cfg, key)
        if path is None:
            continue
        if Path(path).suffix not in _BUILDERS:
            raise DataError(f"data.{key}: {path} has extension {Path(path).suffix!r}; "
                            f"expected one of {sorted(_BUILDERS)}")
        if not Path(path).is_file():
            raise DataError(f"data.{key}: file {path} does not exist")
        if _is_empty(Path(path)):
            raise DataError(f"data.{key}: data file {path} has no rows")
        columns = _peek_columns(Path(path))
        if columns is not None:
            renamed = [(cfg.rename_columns or {}).get(c, c) for c in columns]
            _check_columns(renamed, cfg, f"data file {path}")


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


def _peek_columns(path: Path) -> list[str] | None:
    """Column names from a file's header or first record, without loading the file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_schema(path).names
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


def _check_columns(columns: list[str], cfg: DataConfig, where: str) -> None:
    for key in ("text_column", "text_pair_column", "label_column"):
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


def prepare(cfg: DataConfig, tokenizer, split: str,
            label_names: list[str] | None = None, augment: bool = False) -> TaskData:
    """Load, tokenize and fingerprint one split. Pass the training split's `label_names` when
    preparing the eval split, so string labels map to the same ids. `augment`: add the
    training rows' `data.augment` copies (labelled NO_LABEL), as distillation reads them."""
    raw = load_raw(cfg, split)
    if augment and cfg.augment.copies:
        if cfg.augment.mask_prob > 0 and tokenizer.mask_token is None:
            raise DataError("data.augment.mask_prob: the teacher's tokenizer has no mask "
                            "token; expected data.augment.mask_prob 0")
        raw = with_copies(raw, cfg, tokenizer.mask_token)
    label_names = label_names or label_names_of(raw, cfg)
    label_ids = {name: i for i, name in enumerate(label_names)}
    is_class_label = isinstance(raw.features[cfg.label_column], datasets.ClassLabel)

    def tokenize(batch: dict) -> dict:
        _check_texts(batch, cfg)
        pairs = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        encoded = tokenizer(batch[cfg.text_column], pairs, truncation=True,
                            max_length=cfg.max_length)
        labels = batch[cfg.label_column]
        labels = labels if is_class_label else [label_ids[str(v)] for v in labels]
        copies = batch.get(COPY_COLUMN, [0] * len(labels))
        encoded["labels"] = [NO_LABEL if copy else label
                             for copy, label in zip(copies, labels, strict=True)]
        return encoded

    unknown = set(map(str, raw.unique(cfg.label_column))) - set(label_names)
    if not is_class_label and unknown:
        raise DataError(f"data.label_column: {split} labels {sorted(unknown)} are not among "
                        f"the training labels {label_names}")
    keep = {"example_id"}
    tokenized = raw.map(tokenize, batched=True, desc=f"tokenizing {split}",
                        remove_columns=[c for c in raw.column_names if c not in keep])
    return TaskData(tokenized, label_names, fingerprint(tokenized, cfg.max_length))


def _check_texts(batch: dict, cfg: DataConfig) -> None:
    """A row without text: the tokenizer would stop with a message naming neither."""
    for key in ("text_column", "text_pair_column"):
        column = getattr(cfg, key)
        if column is None:
            continue
        ids = [i for i, text in zip(batch["example_id"], batch[column], strict=True)
               if not isinstance(text, str)]
        if ids:
            raise DataError(f"data.{key}: rows with example ids {ids[:5]} have no text in "
                            f"column {column!r}; expected a string in every row")


def fingerprint(dataset: datasets.Dataset, max_length: int) -> str:
    """sha256 of the processed examples (ids, tokens, labels): what the teacher saw."""
    digest = hashlib.sha256(f"kdscale-data-v1 max_length={max_length}".encode())
    columns = [c for c in MODEL_COLUMNS if c in dataset.column_names and c != "attention_mask"]
    for table in dataset.with_format("arrow").iter(batch_size=16384):
        for name in columns:
            column = table.column(name).combine_chunks()
            if hasattr(column, "flatten"):  # token lists: hash their lengths and contents
                digest.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                column = column.flatten()
            digest.update(column.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length (little padding) in a random order. Each epoch shuffles,
    sorts within windows of `group_batches` batches by length, and shuffles the batches."""

    def __init__(self, lengths: list[int], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, group_batches: int = 50):
        self.lengths, self.batch_size = lengths, batch_size
        self.shuffle, self.seed, self.group_batches = shuffle, seed, group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")  # seed 0 epoch 1 != seed 1 epoch 0
        order = list(range(len(self.lengths)))
        window = max(len(order), 1)
        if self.shuffle:
            rng.shuffle(order)
            window = self.batch_size * self.group_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=self.lengths.__getitem__, reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)


class PaddingCollator:
    """Pads each batch to its own longest example (dynamic padding)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        batch = {}
        for name, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0),
                          ("token_type_ids", 0)):
            if name in examples[0]:
                batch[name] = torch.tensor([e[name] + [pad] * (width - len(e[name]))
                                            for e in examples])
        if "labels" in examples[0]:
            batch["labels"] = _labels(examples)
        if "example_id" in examples[0]:
            batch["example_id"] = torch.tensor([e["example_id"] for e in examples])
        return batch


def _labels(examples: list[dict]) -> torch.Tensor:
    """One label per example, or a list per example (per token, or an answer's start and
    end) padded with -100, the index every loss ignores."""
    if not isinstance(examples[0]["labels"], list):
        return torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    width = max(len(e["labels"]) for e in examples)
    return torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples],
                        dtype=torch.long)


def make_loader(data: TaskData, batch_size: int, collate_fn, *, shuffle: bool,
                seed: int = 0) -> torch.utils.data.DataLoader:
    """Length-grouped batches; `collate_fn` is a `PaddingCollator` or a wrapper around one."""
    lengths = [len(ids) for ids in data.dataset["input_ids"]]
    sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed)
    # Its own generator: starting an epoch must not draw from the global random state, or a
    # resumed run (which starts its epoch after restoring that state) would drift from an
    # uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                       generator=generator)

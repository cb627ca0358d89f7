"""Labelled text tokenized with the teacher's tokenizer, with a fingerprint of the processed
examples (ids, tokens, labels): a cache refuses data it was not built from."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import datasets

from kdscale.config import DataConfig
from kdscale.data.augment import COPY_COLUMN, NO_LABEL, with_copies
from kdscale.data.sources import DataError, label_names_of, load_raw
from kdscale.data.unlabelled import with_unlabelled

# A tokenizer that knows the data leaves a small share of tokens unknown (under 1% for a
# WordPiece vocabulary on English text); one without its vocabulary files leaves nearly all.
UNKNOWN_SHARE_LIMIT = 0.5
SAMPLE_ROWS = 256
DEFAULT_LABEL = re.compile(r"LABEL_\d+")  # transformers' name for output i without id2label
MODEL_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "example_id"]


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


def tokenize_labelled(cfg: DataConfig, tokenizer, split: str,
            label_names: list[str] | None = None, augment: bool = False) -> TaskData:
    """Load, tokenize and fingerprint one split. Pass the training split's `label_names` when
    preparing the eval split, so string labels map to the same ids. `augment`: add the
    distillation's transfer set (labelled NO_LABEL): the training rows' `data.augment`
    copies and `data.unlabelled_file`'s rows."""
    raw = load_raw(cfg, split)
    label_names = label_names or label_names_of(raw, cfg)
    label_ids = {name: i for i, name in enumerate(label_names)}
    is_class_label = isinstance(raw.features[cfg.label_column], datasets.ClassLabel)
    unknown = set(map(str, raw.unique(cfg.label_column))) - set(label_names)
    if not is_class_label and unknown:
        raise DataError(_unknown_labels(split, sorted(unknown), label_names))
    if augment:
        raw = with_unlabelled(with_augmented_copies(raw, cfg, tokenizer), cfg)

    def label_id(copy: int, label) -> int:
        if copy or label is None:  # a copy or an unlabelled row: the teacher labels it
            return NO_LABEL
        return label if is_class_label else label_ids[str(label)]

    def tokenize(batch: dict) -> dict:
        _check_texts(batch, cfg)
        pairs = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        encoded = tokenizer(batch[cfg.text_column], pairs, truncation=True,
                            max_length=cfg.max_length)
        labels = batch[cfg.label_column]
        copies = batch.get(COPY_COLUMN, [0] * len(labels))
        encoded["labels"] = [label_id(copy, label)
                             for copy, label in zip(copies, labels, strict=True)]
        return encoded

    keep = {"example_id"}
    tokenized = raw.map(tokenize, batched=True, desc=f"tokenizing {split}",
                        remove_columns=[c for c in raw.column_names if c not in keep])
    return TaskData(tokenized, label_names, fingerprint(tokenized, cfg.max_length))


def with_augmented_copies(raw: datasets.Dataset, cfg: DataConfig,
                          tokenizer) -> datasets.Dataset:
    if not cfg.augment.copies:
        return raw
    if cfg.augment.mask_prob > 0 and tokenizer.mask_token is None:
        raise DataError("data.augment.mask_prob: the teacher's tokenizer has no mask "
                        "token; expected data.augment.mask_prob 0")
    return with_copies(raw, cfg, tokenizer.mask_token)


def _unknown_labels(split: str, unknown: list[str], label_names: list[str]) -> str:
    if not all(DEFAULT_LABEL.fullmatch(name) for name in label_names):
        return (f"data.label_column: {split} labels {unknown} are not among the training "
                f"labels {label_names}")
    # LABEL_0, LABEL_1, ...: a model saved without id2label (a Trainer script that set
    # num_labels alone). Which output means which class is not recorded: not guessed here.
    example = {str(i): name for i, name in enumerate(sorted(unknown)[:len(label_names)])}
    return (f"data.label_column: {split} labels {unknown[:5]} are not the model's labels "
            f"{label_names}, the names transformers gives a model saved without id2label. "
            f"Set \"id2label\" in the model's config.json to the class each output was trained "
            f"on (e.g. {json.dumps(example)} if output i learned the i-th sorted label, as "
            f"run_glue numbers them) and \"label2id\" to its inverse; when fine-tuning, pass "
            f"id2label= and label2id= to from_pretrained with num_labels")


def _check_texts(batch: dict, cfg: DataConfig) -> None:
    """A row without text (null, or empty): the tokenizer would stop with a message naming
    neither, or make a row of [CLS] [SEP] alone that the teacher still labels."""
    for key in ("text_column", "text_pair_column"):
        column = getattr(cfg, key)
        if column is None:
            continue
        ids = [i for i, text in zip(batch["example_id"], batch[column], strict=True)
               if not isinstance(text, str) or not text.strip()]
        if ids:
            raise DataError(f"data.{key}: rows with example ids {ids[:5]} have no text in "
                            f"column {column!r}; expected a non-empty string in every row")


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


def tokenized_fingerprint(dataset: datasets.Dataset, max_length: int) -> str:
    """`fingerprint` of rows tokenized elsewhere (a Trainer script's): its label column may be
    `label`, and padding (where `attention_mask` is 0) is left out, as kdscale pads only when
    it batches. Equal to the cache's fingerprint when the script read the same file with the
    same tokenizer and truncation."""
    if "labels" not in dataset.column_names and "label" in dataset.column_names:
        dataset = dataset.rename_column("label", "labels")
    dataset = dataset.sort("example_id")  # the cache's order; a script may have shuffled
    if "attention_mask" in dataset.column_names:
        def unpadded(batch: dict) -> dict:
            token_columns = [c for c in ("input_ids", "token_type_ids") if c in batch]
            return {c: [[t for t, m in zip(row, mask, strict=True) if m] for row, mask
                        in zip(batch[c], batch["attention_mask"], strict=True)]
                    for c in token_columns}
        dataset = dataset.map(unpadded, batched=True, desc="fingerprinting")
    return fingerprint(dataset, max_length)


def check_unknown_rate(data: TaskData, tokenizer, where: str) -> None:
    """Refuse data the tokenizer cannot read: most tokens of a sample of its rows unknown.

    Args:
        data: a tokenized split.
        tokenizer: the tokenizer that produced it.
        where: what to name in the error (the tokenizer's source).

    Raises:
        DataError: when more than `UNKNOWN_SHARE_LIMIT` of the sampled tokens are unknown.
    """
    rows = data.dataset.select(range(min(SAMPLE_ROWS, len(data.dataset))))["input_ids"]
    check_rows_readable(rows, tokenizer, where)


def check_rows_readable(rows: list[list[int]], tokenizer, where: str) -> None:
    """`check_unknown_rate` on token rows tokenized elsewhere (a Trainer script's).

    Raises:
        DataError: when more than `UNKNOWN_SHARE_LIMIT` of the rows' tokens are unknown.
    """
    share, tokens = unknown_share(rows, tokenizer)
    if share > UNKNOWN_SHARE_LIMIT:
        raise DataError(f"{where}: {share:.0%} of the {tokens} tokens in the first {len(rows)} "
                        f"rows are {tokenizer.unk_token}; the tokenizer cannot read this data "
                        f"(expected under 1%). Are its vocabulary files (tokenizer.json, "
                        f"vocab.txt) missing, or is it another model's tokenizer?")


def unknown_share(rows: list[list[int]], tokenizer) -> tuple[float, int]:
    """(share of unknown tokens, number of tokens) over `rows`, special tokens left out."""
    unknown_id = tokenizer.unk_token_id
    if unknown_id is None:
        return 0.0, 0
    special = set(tokenizer.all_special_ids) - {unknown_id}
    tokens = [i for ids in rows for i in ids if i not in special]
    return (tokens.count(unknown_id) / len(tokens) if tokens else 0.0), len(tokens)

"""Unlabelled in-domain text as more transfer set for distillation.

With few labelled rows the student matches the teacher on few inputs. Text without labels
(the rest of a corpus, logged queries) costs one teacher forward a row, once, in the cache,
and gives the student that many more inputs to match the teacher on: each such row carries
the soft term of the loss alone (`NO_LABEL`), as an augmented copy does. It is the transfer
set of Hinton et al. (2015) and of Tang et al. (2019), who add it beside augmentation.

The rows come after the training rows and their copies, with example ids from the largest of
theirs + 1, in file order, so every process and rerun gives each row the same id.
"""

from __future__ import annotations

import datasets

from kdscale.config.schema import DataConfig
from kdscale.data.augment import COPY_COLUMN
from kdscale.data.sources import load_unlabelled


def with_unlabelled(raw: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """`raw` (training rows, perhaps with copies), then `data.unlabelled_file`'s rows with no
    label; `raw` keeps only the columns tokenizing reads."""
    if cfg.unlabelled_file is None:
        return raw
    texts = load_unlabelled(cfg)
    keep = [cfg.text_column, cfg.text_pair_column, cfg.label_column, "example_id", COPY_COLUMN]
    raw = raw.select_columns([c for c in raw.column_names if c in keep])
    first = max(raw["example_id"]) + 1
    rows = {column: texts[column] if column in texts.column_names else [None] * len(texts)
            for column in raw.column_names}
    rows["example_id"] = list(range(first, first + len(texts)))
    if COPY_COLUMN in rows:
        rows[COPY_COLUMN] = [0] * len(texts)
    return datasets.concatenate_datasets(
        [raw, datasets.Dataset.from_dict(rows, features=raw.features)])

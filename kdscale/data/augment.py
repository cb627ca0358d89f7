"""Augmented copies of the training rows: a bigger transfer set for distillation.

On a small labelled set the student sees few inputs on which to match the teacher, and the
teacher adds little that the labels do not already say. Following Tang et al. (2019,
"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"), each row gets
`copies` noisy variants: every word is, with `mask_prob`, replaced by the mask token or, with
`replace_prob`, by a word drawn from the training text by frequency (their rule takes a word
of the same part of speech; no tagger is assumed here); then, with `ngram_prob`, the copy is
cut to a random span of 1..`max_ngram` words.

A copy has no label (`NO_LABEL`): the teacher labels it, once, in the cache, so it carries
the soft term of the loss and no hard term. Each copy is drawn from (seed, example id, copy
number), like the masked-LM masks, so the cache and every distillation process build the
same copies, and its example id follows the originals': id + copy * (largest id + 1).
"""

from __future__ import annotations

import random

import datasets

from kdscale.config.schema import AugmentConfig, DataConfig

NO_LABEL = -1  # a row of the loss without a hard label: the soft term only
COPY_COLUMN = "augment_copy"  # 0 for an original row, 1..copies for its copies
_REDRAWS = 10  # a copy identical to its original adds nothing; draw again, this many times


def with_copies(raw: datasets.Dataset, cfg: DataConfig, mask_token: str | None
                ) -> datasets.Dataset:
    """`raw` (with its `example_id`s), then `cfg.augment.copies` copies of every row, each row
    marked in COPY_COLUMN."""
    aug = cfg.augment
    columns = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    vocabulary = [word for c in columns for text in raw[c] if isinstance(text, str)
                  for word in text.split()]
    stride = max(raw["example_id"]) + 1

    def copy_rows(batch: dict, copy: int) -> dict:
        ids = batch["example_id"]
        out = {**batch, "example_id": [i + copy * stride for i in ids],
               COPY_COLUMN: [copy] * len(ids)}
        for column in columns:
            out[column] = [noisy_copy(text, random.Random(f"{aug.seed}/{i}/{copy}/{column}"),
                                      aug, vocabulary, mask_token)
                           for i, text in zip(ids, batch[column], strict=True)]
        return out

    parts = [raw.add_column(COPY_COLUMN, [0] * len(raw))]
    parts += [raw.map(copy_rows, batched=True, fn_kwargs={"copy": copy},
                      desc=f"augmenting (copy {copy} of {aug.copies})")
              for copy in range(1, aug.copies + 1)]
    return datasets.concatenate_datasets(parts)


def noisy_copy(text, rng: random.Random, aug: AugmentConfig, vocabulary: list[str],
               mask_token: str | None):
    """One variant of `text`, different from it where the draws allow (a text that is not a
    string is returned as it is, for the tokenizer's check to name)."""
    if not isinstance(text, str) or not text.split():
        return text
    for _ in range(_REDRAWS):
        copy = _draw(text.split(), rng, aug, vocabulary, mask_token)
        if copy != text:
            return copy
    return copy


def _draw(words: list[str], rng: random.Random, aug: AugmentConfig, vocabulary: list[str],
          mask_token: str | None) -> str:
    out = []
    for word in words:
        roll = rng.random()
        if roll < aug.mask_prob:
            word = mask_token
        elif roll < aug.mask_prob + aug.replace_prob:
            word = rng.choice(vocabulary)
        out.append(word)
    if rng.random() < aug.ngram_prob:
        n = rng.randint(1, min(aug.max_ngram, len(out)))
        start = rng.randint(0, len(out) - n)
        out = out[start:start + n]
    return " ".join(out)

"""Batches: length-grouped sampling (little padding), padding collation and the loader."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from kdscale.data.batch import IGNORE_INDEX
from kdscale.data.tokenize import TaskData


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
    return torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"]))
                         for e in examples],
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

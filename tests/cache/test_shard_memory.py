"""A shard too large for the memory beside it is refused at the first batch, with the
shard_rows that would fit."""

import re

import pytest
import torch

from kdscale.cache import CacheError
from kdscale.cache.building import SHARD_COPIES, check_shard_fits

GiB = 2**30


def vocabulary_rows(rows: int, vocabulary: int) -> dict:
    """A batch's stored rows of a top-k cache that keeps every logit (float16, uint16)."""
    return {"example_ids": torch.zeros(rows, dtype=torch.int64),
            "values": torch.zeros(rows, vocabulary, dtype=torch.float16),
            "indices": torch.zeros(rows, vocabulary, dtype=torch.uint16)}


def test_a_shard_over_the_free_memory_is_refused_with_a_size_that_fits():
    batch = vocabulary_rows(rows=16, vocabulary=30522)
    per_row = sum(t.numel() * t.element_size() for t in batch.values()) / 16
    available, shard_rows, shard_examples = 4 * GiB, 30_000, 8192
    with pytest.raises(CacheError) as err:
        check_shard_fits(batch, shard_rows, shard_examples, processes=2, available=available)
    message = str(err.value)
    assert message.startswith("cache.shard_rows:") and "8,192 examples (30,000 cached" in message
    assert "2 process(es)" in message
    fits = int(re.search(r"set cache.shard_rows to ([\d,]+) or fewer", message)[1]
               .replace(",", ""))
    rows_each = shard_rows / shard_examples  # the shard's rows an example, kept as it shrinks
    assert fits * rows_each * per_row * SHARD_COPIES <= available / 2
    assert (fits + 1) * rows_each * per_row * SHARD_COPIES > available / 2
    check_shard_fits(batch, int(fits * rows_each), fits, processes=2, available=available)


def test_one_process_gets_the_whole_free_memory():
    batch = vocabulary_rows(rows=4, vocabulary=1000)
    shard_bytes = sum(t.numel() * t.element_size() for t in batch.values()) / 4 * 100
    enough = int(shard_bytes * SHARD_COPIES) + 1
    check_shard_fits(batch, 100, 50, processes=1, available=enough)
    with pytest.raises(CacheError, match="cache.shard_rows"):
        check_shard_fits(batch, 100, 50, processes=2, available=enough)

"""Which examples go in which shard, and which process writes it.

The plan depends on the data and `shard_rows` only, never on the number of processes: a
cache is the same whether 1, 2 or 64 processes wrote it, and a job that died can resume
with a different world size. Examples are sorted by length (longest first) before they are
cut into shards, so the batches inside a shard need little padding; shard i is written by
process i mod world_size, which spreads long and short shards evenly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    shards: list[list[int]]  # dataset row indices of each shard, longest examples first

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, len(self.shards), world_size))

    def batches(self, shard: int, batch_size: int) -> list[list[int]]:
        rows = self.shards[shard]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def plan_shards(lengths: list[int], shard_rows: int) -> ShardPlan:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return ShardPlan([order[i:i + shard_rows] for i in range(0, len(order), shard_rows)])


def plan_id(**settings) -> str:
    """Identity of everything that decides a cache's bytes: data, teacher, tokenizer, shard
    size, storage kind and dtype. Shards of a different plan are never mixed in."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

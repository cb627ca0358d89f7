"""A top-k cache with a tail slot: each row's tail (the teacher's mass off its k slots) is
written, verified, read back in request order and handed to the loss by the collator."""

import json

import pytest
import torch

from kdscale.cache import CacheError, CacheWriter, LogitCache, TeacherLogitsCollator
from kdscale.cache.format import CacheManifest
from tests.support.cache import META

TOPK = {"kind": "topk", "k": 2, "num_outputs": 6, "dtype": "float32", **META}


def _rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values, indices = torch.randn(n, 6, generator=g).topk(2, dim=-1)
    return torch.arange(n), values, indices, torch.rand(n, generator=g)


def test_tails_round_trip_in_request_order_and_reach_the_batch(tmp_path):
    ids, values, indices, tail = _rows(10)
    with CacheWriter(tmp_path, shard_rows=4, tail_temperature=2.0, **TOPK) as writer:
        writer.add(ids, values=values, indices=indices, tail=tail)
    cache = LogitCache(tmp_path)
    assert cache.manifest.tail_temperature == 2.0
    want = [7, 1, 9]
    assert torch.equal(cache.get_topk(want).tail, tail[want])
    cache.verify()  # the tails are in the checksummed, finite-checked shards
    collate = TeacherLogitsCollator(lambda rows: {}, cache)
    batch = collate([{"example_id": i} for i in want])
    assert torch.equal(batch["teacher_topk_tail"], tail[want])


def test_a_cache_without_tails_gives_none_and_adds_nothing_to_the_batch(tmp_path):
    ids, values, indices, _ = _rows(3)
    with CacheWriter(tmp_path, **TOPK) as writer:
        writer.add(ids, values=values, indices=indices)
    assert LogitCache(tmp_path).get_topk([0]).tail is None
    assert "teacher_topk_tail" not in TeacherLogitsCollator(lambda r: {}, LogitCache(tmp_path))(
        [{"example_id": 0}])


@pytest.mark.parametrize("tail, match", [
    (None, "tail: give it with every add"),
    (torch.tensor([0.1, float("nan"), 0.2]), "tail is not finite for example ids \\[1\\]"),
    (torch.tensor([0.1, 1.5, 0.2]), "1.5 for example id 1 is not a probability mass"),
    (torch.tensor([0.1, 0.2]), "tail: expected a floating-point tensor \\[rows=3\\]"),
])
def test_bad_tails_are_refused_before_anything_is_written(tmp_path, tail, match):
    ids, values, indices, _ = _rows(3)
    with pytest.raises(CacheError, match=match):
        with CacheWriter(tmp_path, shard_rows=2, tail_temperature=1.0, **TOPK) as writer:
            writer.add(ids, values=values, indices=indices, tail=tail)
    assert not list(tmp_path.glob("shard-*"))


def test_a_tail_given_to_a_cache_without_a_tail_temperature_is_refused(tmp_path):
    ids, values, indices, tail = _rows(3)
    with pytest.raises(CacheError, match="never to one without"):
        with CacheWriter(tmp_path, **TOPK) as writer:
            writer.add(ids, values=values, indices=indices, tail=tail)


@pytest.mark.parametrize("kind, temperature", [("dense", 2.0), ("topk", 0.0), ("topk", True)])
def test_the_manifest_refuses_a_tail_temperature_that_cannot_be(kind, temperature):
    fields = {**TOPK, "kind": kind, "k": None if kind == "dense" else 2}
    with pytest.raises(CacheError, match="'tail_temperature': expected null, or a temperature"):
        CacheManifest(**fields, masking=None, tail_temperature=temperature, num_examples=0,
                      num_rows=0, shards=[])


def test_a_manifest_without_the_field_reads_as_no_tail(tmp_path):
    ids, values, indices, _ = _rows(3)
    with CacheWriter(tmp_path, **TOPK) as writer:
        writer.add(ids, values=values, indices=indices)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["tail_temperature"]  # as a cache written before tails existed
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert LogitCache(tmp_path).manifest.tail_temperature is None

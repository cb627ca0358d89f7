"""The logit cache: real safetensors shards on disk, written and read back bit-exactly.

Round trips and reading here; writing (refused rows, overwrite, ranks, sidecars, finalize) in
test_cache_writer.py, which shares META, dense_rows, write_dense and assert_bits_equal.
"""

import json
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch

from kdscale.cache import (
    CacheError,
    CacheManifest,
    CacheMismatchError,
    CacheWriter,
    LogitCache,
    TeacherLogitsCollator,
    finalize_cache,
    read_manifest,
    write_shard,
)
from kdscale.cache.rows import join_shard_tensors, shard_tensors
from kdscale.cache.writer import write_shard_tensors
from tests.support.cache import DTYPES, META, MLM, assert_bits_equal, dense_rows, write_dense


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_round_trip_bit_exact_across_shards(tmp_path, dtype):
    ids, logits = dense_rows(n=23)
    manifest = write_dense(tmp_path, ids, logits, dtype=dtype)
    assert [s["rows"] for s in manifest.shards] == [7, 7, 7, 2]  # 7 does not divide 23
    assert manifest.shards[2]["file"] == "shard-00002.safetensors"

    cache = LogitCache(tmp_path)
    assert len(cache) == 23 and int(ids[5]) in cache and -1 not in cache
    assert torch.equal(cache.example_ids(), ids.sort().values)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    got = cache.get(ids[order])
    assert_bits_equal(got, logits[order].to(DTYPES[dtype]))
    assert cache.manifest == read_manifest(tmp_path) == manifest
    cache.verify()
    with pytest.raises(KeyError, match=r"example id 5 is not in .*\(2 of 3 requested"):
        cache.get([int(ids[0]), 5, 6])


def test_get_maps_only_touched_shards_and_a_bounded_number(tmp_path, monkeypatch):
    ids, logits = dense_rows(n=40)
    write_dense(tmp_path, ids, logits, dtype="float32")  # shards of rows 0-6, 7-13, ..., 35-39
    cache = LogitCache(tmp_path)
    pick = ids[[38, 2, 9, 3]]  # shards 5, 0, 1, 0: out of order, repeated shard
    assert_bits_equal(cache.get(pick), logits[[38, 2, 9, 3]])
    opened = sorted(s for s, _ in cache._arrays)
    assert opened == [0, 1, 5]
    assert all(isinstance(a, np.memmap) for a in cache._arrays.values())
    assert cache.get(torch.empty(0, dtype=torch.long)).shape == (0, 5)
    monkeypatch.setattr("kdscale.cache.reader.MAX_OPEN_MAPS", 2)
    assert_bits_equal(cache.get(ids), logits)
    assert len(cache._arrays) == 2


def test_pickled_cache_reopens_maps_instead_of_copying_data(tmp_path):
    ids, logits = dense_rows(n=40, c=300)
    write_dense(tmp_path, ids, logits, dtype="float32")
    cache = LogitCache(tmp_path)
    cache.get(ids)  # opens every map
    blob = pickle.dumps(cache)
    assert len(blob) < logits.numel() * 4 // 4  # far less than the logits themselves
    assert_bits_equal(pickle.loads(blob).get(ids[[0, 39]]), logits[[0, 39]])


def test_topk_round_trip_with_padding(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, k, vocab = 19, 4, 30522
    values, indices = torch.randn(n, k, generator=g).sort(dim=1, descending=True)[0], \
        torch.randint(0, vocab, (n, k), generator=g)
    indices[3, 2:] = -1
    values[3, 2:] = float("-inf")  # padding slots may hold -inf; only valid slots must be finite
    indices[11, 1:] = -1
    ids = torch.arange(n) * 3
    with CacheWriter(tmp_path, kind="topk", k=k, num_outputs=vocab, shard_rows=5, **META) as w:
        w.add(ids[:10], values=values[:10], indices=indices[:10])
        w.add(ids[10:], values=values[10:], indices=indices[10:])
    cache = LogitCache(tmp_path)
    assert cache.manifest.kind == "topk" and len(cache.manifest.shards) == 4
    order = torch.tensor([18, 3, 0, 11, 7])
    got = cache.get_topk(ids[order])
    assert_bits_equal(got.values, values[order].half())
    assert got.indices.dtype == torch.int64  # what torch.gather takes
    assert torch.equal(got.indices, indices[order])
    assert got.positions is None and got.counts.tolist() == [1] * 5
    with pytest.raises(CacheError, match="use get_topk"):
        cache.get(ids[:1])


def test_not_a_cache_missing_directory_and_missing_or_truncated_shards(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        LogitCache(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CacheError, match=r"is not a kdscale logit cache \(no manifest.json\); "
                                         r"run `kdscale cache`"):
        LogitCache(tmp_path)
    ids, logits = dense_rows()
    manifest = write_dense(tmp_path, ids, logits)
    shard = tmp_path / manifest.shards[1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors has \d+ bytes.*trunc"):
        LogitCache(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors .* is missing"):
        LogitCache(tmp_path)


def test_verify_catches_a_flipped_byte(tmp_path):
    ids, logits = dense_rows()
    manifest = write_dense(tmp_path, ids, logits)
    shard = tmp_path / manifest.shards[2]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # inside the logits: same size, header intact
    shard.write_bytes(bytes(data))
    cache = LogitCache(tmp_path)  # the cheap checks pass
    with pytest.raises(CacheError, match="shard-00002.safetensors: its bytes differ from the"):
        cache.verify()


def test_check_compatible_names_each_differing_field(tmp_path):
    ids, logits = dense_rows()
    masking = {"seed": 0, "probability": 0.15}
    write_dense(tmp_path, ids, logits, masking=masking)
    cache = LogitCache(tmp_path)
    cache.check_compatible(data_fingerprint=META["data_fingerprint"], num_outputs=5,
                           teacher_sha256="a" * 64, tokenizer_sha256="b" * 64, masking=masking)
    with pytest.raises(CacheMismatchError) as err:
        cache.check_compatible(data_fingerprint="sst2-train-maxlen64-seed0", num_outputs=5,
                               teacher_sha256="c" * 64, masking={**masking, "seed": 1})
    msg = str(err.value)
    assert "data_fingerprint: cache has 'sst2-train-maxlen128-seed0', expected " in msg
    assert f"teacher_sha256: cache has '{'a' * 64}', expected '{'c' * 64}'" in msg
    assert "masking: cache has {'seed': 0, " in msg
    cache.check_compatible(num_outputs=5)  # masking not given: not checked
    with pytest.raises(CacheMismatchError, match="masking: cache has .*, expected None"):
        cache.check_compatible(masking=None)  # data without masks, a cache with them
    assert "num_outputs" not in msg and "kdscale cache" in msg


def test_manifest_validation_names_the_field(tmp_path):
    ids, logits = dense_rows()
    write_dense(tmp_path, ids, logits)
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())
    for change, pattern in [
        ({"format_version": 2}, "'format_version': expected 1, got 2"),
        ({"kind": "sparse"}, "'kind': expected 'dense' or 'topk', got 'sparse'"),
        ({"k": 3}, "'k': expected null for a dense cache"),
        ({"num_examples": 99}, r"'num_examples': expected 23 \(the sum"),
        ({"num_rows": 5}, r"'num_rows': expected 23 \(the sum"),
        ({"masking": "seed0"}, "'masking': expected an object or null"),
        ({"shards": [{**good["shards"][0], "file": "../x.safetensors"}] + good["shards"][1:]},
         r"'shards\[0\].file': expected 'shard-00000.safetensors'"),
    ]:
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(CacheError, match=pattern):
            read_manifest(tmp_path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "teacher"}))
    with pytest.raises(CacheError, match="missing field.*'teacher'"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        read_manifest(tmp_path)
    m = CacheManifest.from_json(json.dumps(good))
    assert CacheManifest.from_json(m.to_json()) == m


def masked_rows(n=11, k=3, vocab=50):
    """Per-position top-k rows of n examples with 0 to 3 masked positions each: (ids, counts,
    rows_of), where rows_of(slice of examples) gives the add() / write_shard() arguments."""
    g = torch.Generator().manual_seed(0)
    ids, counts = torch.arange(n) * 10 + 7, torch.randint(0, 4, (n,), generator=g)
    r = int(counts.sum())  # counts: [0, 3, 1, 0, 3, 3, 3, 3, 1, 3, 1]
    values, indices = torch.randn(r, k, generator=g), torch.randint(-1, vocab, (r, k), generator=g)
    positions, row_ids = torch.randint(1, 64, (r,), generator=g), ids.repeat_interleave(counts)

    def rows_of(part=slice(None)):
        rows = torch.isin(row_ids, ids[part])
        return {"example_ids": row_ids[rows], "values": values[rows], "indices": indices[rows],
                "positions": positions[rows], "empty_ids": ids[part][counts[part] == 0]}
    return ids, counts, rows_of


def write_joined_batches(directory, rows_of) -> None:
    """Two shards, each joined from batches stored one by one (as `kdscale cache` builds
    them): examples without rows fall inside a batch and at batch edges."""
    settings = {"dtype": "float32", "num_outputs": 50, "k": 3}
    for i, batches in enumerate([[slice(0, 3), slice(3, 6)], [slice(6, 9), slice(9, 11)]]):
        parts = []
        for part in batches:
            rows = rows_of(part)
            parts.append(shard_tensors(rows.pop("example_ids"), None, rows.pop("values"),
                                       rows.pop("indices"), rows.pop("positions"),
                                       rows.pop("empty_ids"), **settings))
        write_shard_tensors(directory, i, join_shard_tensors(parts), plan_id="mlm")
    finalize_cache(directory, num_shards=2, plan_id="mlm", **MLM)


@pytest.mark.parametrize("writer", ["write_shard", "CacheWriter", "joined batches"])
def test_per_position_topk_round_trip(tmp_path, writer):
    ids, counts, rows_of = masked_rows()
    if writer == "joined batches":
        write_joined_batches(tmp_path, rows_of)
    elif writer == "write_shard":
        for i, part in enumerate([slice(0, 6), slice(6, 11)]):
            write_shard(tmp_path, i, plan_id="mlm", k=3, num_outputs=50, dtype="float32",
                        **rows_of(part))
        finalize_cache(tmp_path, num_shards=2, plan_id="mlm", **MLM)
    else:
        with CacheWriter(tmp_path, shard_rows=4, **MLM) as w:  # cuts only between examples
            w.add(**rows_of(slice(0, 7)))
            w.add(**rows_of(slice(7, 11)))
    cache = LogitCache(tmp_path)
    assert cache.per_position and len(cache) == 11 and len(cache.manifest.shards) >= 2
    assert cache.manifest.num_rows == int(counts.sum()) and cache.manifest.masking["seed"] == 0
    order = [5, 3, 10, 0, 2, 5]  # shuffled, one id twice; examples 0 and 3 have no rows
    got = cache.get_topk(ids[order])
    assert torch.equal(got.counts, counts[order])
    want = [rows_of(slice(i, i + 1)) for i in order]
    assert_bits_equal(got.values, torch.cat([w["values"] for w in want]))
    for key in ("indices", "positions"):  # int64, what torch.gather and indexing take
        assert torch.equal(getattr(got, key), torch.cat([w[key] for w in want]))


def test_a_shard_has_the_same_bytes_however_its_rows_were_batched(tmp_path):
    _, _, rows_of = masked_rows()  # examples 0 and 3 have no rows
    settings = {"dtype": "int8", "num_outputs": 50, "k": 3}
    write_shard(tmp_path / "whole", 0, plan_id="p", **settings, **rows_of())
    parts = []
    for part in (slice(0, 1), slice(1, 4), slice(4, 11)):
        rows = rows_of(part)
        parts.append(shard_tensors(rows.pop("example_ids"), None, rows.pop("values"),
                                   rows.pop("indices"), rows.pop("positions"),
                                   rows.pop("empty_ids"), **settings))
    write_shard_tensors(tmp_path / "joined", 0, join_shard_tensors(parts), plan_id="p")
    with CacheWriter(tmp_path / "writer", **{**MLM, "dtype": "int8"}) as w:
        for part in (slice(0, 4), slice(4, 11)):
            w.add(**rows_of(part))
    whole = safetensors.torch.load_file(tmp_path / "whole" / "shard-00000.safetensors")
    for name in ("joined", "writer"):
        shard = safetensors.torch.load_file(tmp_path / name / "shard-00000.safetensors")
        assert shard.keys() == whole.keys(), name
        for key, tensor in whole.items():
            assert tensor.dtype == shard[key].dtype and torch.equal(
                tensor.view(torch.uint8), shard[key].view(torch.uint8)), (name, key)


def test_joined_batches_refuse_an_example_twice():
    _, _, rows_of = masked_rows()
    settings = {"dtype": "float32", "num_outputs": 50, "k": 3}
    rows = rows_of(slice(1, 3))  # example 1's rows, then example 2's
    part = shard_tensors(rows["example_ids"], None, rows["values"], rows["indices"],
                         rows["positions"], rows["empty_ids"], **settings)
    with pytest.raises(CacheError, match=r"example id 17 appears twice"):
        join_shard_tensors([part, part])


def test_collator_attaches_the_keys_of_each_kind(tmp_path):
    def base(examples):
        return {"example_id": torch.tensor([e["example_id"] for e in examples])}

    def collate(name, ids):
        collator = TeacherLogitsCollator(base, LogitCache(tmp_path / name))
        return collator([{"example_id": int(i)} for i in ids])

    ids, logits = dense_rows()
    write_dense(tmp_path / "dense", ids, logits)
    batch = collate("dense", ids[[4]])
    assert set(batch) == {"example_id", "teacher_logits"}
    assert_bits_equal(batch["teacher_logits"], logits[[4]].half())

    ids, _, rows_of = masked_rows()
    with CacheWriter(tmp_path / "mlm", **MLM) as w:
        w.add(**rows_of())
    with CacheWriter(tmp_path / "topk", **MLM) as w:  # one row per example
        w.add(ids[:4], values=torch.zeros(4, 3), indices=torch.zeros(4, 3, dtype=torch.long))
    topk = {"example_id", "teacher_topk_values", "teacher_topk_indices"}
    batch = collate("topk", ids[[3, 2]])
    assert set(batch) == topk and batch["teacher_topk_values"].shape == (2, 3)
    batch = collate("mlm", ids[[4, 3]])
    assert set(batch) == topk | {"teacher_topk_positions", "teacher_topk_counts"}
    assert batch["teacher_topk_counts"].tolist() == [3, 0]
    assert torch.equal(batch["teacher_topk_positions"], rows_of(slice(4, 5))["positions"])

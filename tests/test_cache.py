"""The logit cache: real safetensors shards on disk, written and read back bit-exactly."""

import json
import pickle

import numpy as np
import pytest
import torch

from kdscale.cache import (
    CacheError,
    CacheManifest,
    CacheMismatchError,
    CacheWriter,
    LogitCache,
    read_manifest,
)

META = {"teacher": {"name": "bert-large-sst2", "weights_sha256": "a" * 64},
        "tokenizer_sha256": "b" * 64, "data_fingerprint": "sst2-train-maxlen128-seed0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dense_rows(n=23, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n] + 1000  # sparse, unordered ids
    return ids, torch.randn(n, c, generator=g) * 8


def write_dense(directory, ids, logits, *, batch=4, **kw):
    opts = {"num_outputs": logits.shape[1], "shard_rows": 7, **META, **kw}
    with CacheWriter(directory, **opts) as w:
        for i in range(0, len(ids), batch):  # batches that straddle shard boundaries
            w.add(ids[i:i + batch], logits[i:i + batch])
    return w.close()


def assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_round_trip_bit_exact_across_shards(tmp_path, dtype):
    ids, logits = dense_rows(n=23)
    manifest = write_dense(tmp_path, ids, logits, dtype=dtype)
    assert [s["rows"] for s in manifest.shards] == [7, 7, 7, 2]  # 7 does not divide 23
    assert manifest.shards[2]["file"] == "shard-r00000-00002.safetensors"

    cache = LogitCache(tmp_path)
    assert len(cache) == 23 and int(ids[5]) in cache and -1 not in cache
    assert torch.equal(cache.example_ids(), ids.sort().values)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    got = cache.get(ids[order])
    assert_bits_equal(got, logits[order].to(DTYPES[dtype]))
    assert cache.manifest == read_manifest(tmp_path) == manifest
    cache.verify()


def test_get_maps_only_touched_shards(tmp_path):
    ids, logits = dense_rows(n=40)
    write_dense(tmp_path, ids, logits, dtype="float32")  # shards of rows 0-6, 7-13, ..., 35-39
    cache = LogitCache(tmp_path)
    pick = ids[[38, 2, 9, 3]]  # shards 5, 0, 1, 0: out of order, repeated shard
    assert_bits_equal(cache.get(pick), logits[[38, 2, 9, 3]])
    opened = sorted(s for s, _ in cache._arrays)
    assert opened == [0, 1, 5]
    assert all(isinstance(a, np.memmap) for a in cache._arrays.values())
    assert cache.get(torch.empty(0, dtype=torch.long)).shape == (0, 5)


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
    got_values, got_indices = cache.get_topk(ids[order])
    assert_bits_equal(got_values, values[order].half())
    assert got_indices.dtype == torch.int32
    assert torch.equal(got_indices, indices[order].int())
    with pytest.raises(CacheError, match="use get_topk"):
        cache.get(ids[:1])


def test_topk_rejects_out_of_range_indices(tmp_path):
    with CacheWriter(tmp_path, kind="topk", k=2, num_outputs=10, **META) as w:
        with pytest.raises(CacheError, match="10 is outside"):
            w.add(torch.tensor([0]), values=torch.zeros(1, 2), indices=torch.tensor([[1, 10]]))


def test_not_a_cache_and_missing_directory(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        LogitCache(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CacheError, match=r"is not a kdscale logit cache \(no manifest.json\); "
                                         r"run `kdscale cache`"):
        LogitCache(tmp_path)


def test_missing_and_truncated_shards_are_named(tmp_path):
    ids, logits = dense_rows()
    manifest = write_dense(tmp_path, ids, logits)
    shard = tmp_path / manifest.shards[1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CacheError, match=r"shard-r00000-00001\.safetensors has \d+ bytes.*trunc"):
        LogitCache(tmp_path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-r00000-00001\.safetensors .* is missing"):
        LogitCache(tmp_path)


def test_verify_catches_a_flipped_byte(tmp_path):
    ids, logits = dense_rows()
    manifest = write_dense(tmp_path, ids, logits)
    shard = tmp_path / manifest.shards[2]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # inside the logits: same size, header intact
    shard.write_bytes(bytes(data))
    cache = LogitCache(tmp_path)  # the cheap checks pass
    with pytest.raises(CacheError, match="shard-r00000-00002.safetensors do not match"):
        cache.verify()


def test_check_compatible_names_each_differing_field(tmp_path):
    ids, logits = dense_rows()
    write_dense(tmp_path, ids, logits)
    cache = LogitCache(tmp_path)
    cache.check_compatible(data_fingerprint=META["data_fingerprint"], num_outputs=5,
                           teacher_sha256="a" * 64, tokenizer_sha256="b" * 64)
    with pytest.raises(CacheMismatchError) as err:
        cache.check_compatible(data_fingerprint="sst2-train-maxlen64-seed0", num_outputs=5,
                               teacher_sha256="c" * 64)
    msg = str(err.value)
    assert "data_fingerprint: cache has 'sst2-train-maxlen128-seed0', expected " in msg
    assert f"teacher_sha256: cache has '{'a' * 64}', expected '{'c' * 64}'" in msg
    assert "num_outputs" not in msg and "kdscale cache" in msg


def test_writer_rejects_bad_rows_and_keeps_nothing_of_them(tmp_path):
    with CacheWriter(tmp_path, num_outputs=3, shard_rows=100, **META) as w:
        w.add(torch.tensor([1, 2]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="example id 2 was added twice"):
            w.add(torch.tensor([5, 2]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="example id 7 was added twice"):
            w.add(torch.tensor([7, 7]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="4 columns, expected num_outputs=3"):
            w.add(torch.tensor([8]), torch.zeros(1, 4))
        bad = torch.zeros(4, 3)
        bad[1, 0], bad[3, 2] = float("nan"), float("inf")
        with pytest.raises(CacheError, match=r"2 of 4 rows of logits are not finite.*id 11"):
            w.add(torch.tensor([10, 11, 12, 13]), bad)
        with pytest.raises(CacheError, match="overflow float16"):
            w.add(torch.tensor([20]), torch.tensor([[0.0, 1e5, 0.0]]))
        w.add(torch.tensor([5, 10]), torch.ones(2, 3))  # ids of rejected batches are still free
    assert LogitCache(tmp_path).example_ids().tolist() == [1, 2, 5, 10]


def test_exception_inside_with_leaves_no_manifest(tmp_path):
    ids, logits = dense_rows()
    with pytest.raises(RuntimeError, match="teacher died"):
        with CacheWriter(tmp_path, num_outputs=5, shard_rows=7, **META) as w:
            w.add(ids, logits)  # three full shards reach the disk
            raise RuntimeError("teacher died")
    assert not (tmp_path / "manifest.json").exists()
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    with pytest.raises(CacheError, match="no manifest.json"):
        LogitCache(tmp_path)


def test_unknown_id_raises_key_error_naming_it(tmp_path):
    ids, logits = dense_rows()
    write_dense(tmp_path, ids, logits)
    with pytest.raises(KeyError, match=r"example id 5 is not in .*\(2 of 3 requested"):
        LogitCache(tmp_path).get([int(ids[0]), 5, 6])


def test_overwrite(tmp_path):
    ids, logits = dense_rows(n=30)
    write_dense(tmp_path, ids, logits)  # 5 shards
    with pytest.raises(CacheError, match="already holds a complete logit cache"):
        CacheWriter(tmp_path, num_outputs=5, **META)

    # Failing before any shard is written leaves the old cache whole.
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path, num_outputs=5, overwrite=True, **META):
            raise RuntimeError("tokenizer failed")
    assert_bits_equal(LogitCache(tmp_path).get(ids), logits.half())

    # Once new shards replace old files of the same name, the old manifest must be gone.
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path, num_outputs=5, shard_rows=7, overwrite=True, **META) as w:
            w.add(ids[:8], logits[:8] + 1)
            raise RuntimeError("teacher died")
    with pytest.raises(CacheError, match="no manifest.json"):
        LogitCache(tmp_path)

    new_ids, new_logits = dense_rows(n=10, seed=1)
    manifest = write_dense(tmp_path, new_ids, new_logits, overwrite=True)  # 2 shards
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["manifest.json"] + [s["file"] for s in manifest.shards])
    cache = LogitCache(tmp_path)
    assert len(cache) == 10
    assert_bits_equal(cache.get(new_ids), new_logits.half())
    cache.verify()


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
        ({"shards": [{**good["shards"][0], "file": "../x.safetensors"}] + good["shards"][1:]},
         r"'shards\[0\].file'"),
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


def test_writer_validates_arguments_before_writing(tmp_path):
    with pytest.raises(CacheError, match="'dtype'"):
        CacheWriter(tmp_path / "c", num_outputs=5, dtype="fp16", **META)
    with pytest.raises(CacheError, match="'k'"):
        CacheWriter(tmp_path / "c", num_outputs=5, kind="topk", **META)
    assert not (tmp_path / "c").exists()


def test_open_maps_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("kdscale.cache.reader.MAX_OPEN_MAPS", 2)
    ids, logits = dense_rows(n=40)
    write_dense(tmp_path, ids, logits, dtype="float32")  # 6 shards
    cache = LogitCache(tmp_path)
    assert_bits_equal(cache.get(ids), logits)
    assert len(cache._arrays) == 2


def _merge_rank_shards(tmp_path, ids0, ids1):
    """A cache whose manifest lists shards of two ranks, as a multi-rank run will write it."""
    _, logits = dense_rows(n=len(ids0) + len(ids1))
    m0 = write_dense(tmp_path / "c", ids0, logits[:len(ids0)], dtype="float32")
    m1 = write_dense(tmp_path / "r1", ids1, logits[len(ids0):], dtype="float32", rank=1)
    for s in m1.shards:
        (tmp_path / "r1" / s["file"]).rename(tmp_path / "c" / s["file"])
    merged = {**m0.to_dict(), "shards": m0.shards + m1.shards,
              "num_examples": m0.num_examples + m1.num_examples}
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(merged))
    return logits


def test_shards_of_several_ranks_are_read_together(tmp_path):
    ids = torch.arange(20) * 7
    logits = _merge_rank_shards(tmp_path, ids[:12], ids[12:])
    cache = LogitCache(tmp_path / "c")
    assert cache.manifest.shards[-1]["file"] == "shard-r00001-00001.safetensors"
    assert_bits_equal(cache.get(ids.flip(0)), logits.flip(0))


def test_an_id_in_two_shards_is_refused(tmp_path):
    _merge_rank_shards(tmp_path, torch.arange(10), torch.arange(9, 12))
    with pytest.raises(CacheError, match=r"example id 9 appears more than once.*"
                                         r"shard-r00000-00001.*shard-r00001-00000"):
        LogitCache(tmp_path / "c")

"""The logit cache: real safetensors shards on disk, written and read back bit-exactly."""

import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kdscale.cache import (
    CacheError,
    CacheManifest,
    CacheMismatchError,
    CacheWriter,
    LogitCache,
    TeacherLogitsCollator,
    clear_partial,
    finalize_cache,
    finished_shards,
    read_manifest,
    write_shard,
)

META = {"teacher": {"name": "bert-large-sst2", "weights_sha256": "a" * 64},
        "tokenizer_sha256": "b" * 64, "data_fingerprint": "sst2-train-maxlen128-seed0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD = {"dtype": "float32", "num_outputs": 5, "plan_id": "plan-a"}  # write_shard settings
FINAL = {"kind": "dense", "num_outputs": 5, "k": None, "dtype": "float32", "plan_id": "plan-a",
         **META}  # finalize_cache settings of the same plan
MLM = {"kind": "topk", "k": 3, "num_outputs": 50, "dtype": "float32", **META,
       "masking": {"seed": 0, "probability": 0.15}}  # a masked-LM top-k cache


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
    with pytest.raises(CacheError, match="shard-00002.safetensors do not match"):
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
    assert "num_outputs" not in msg and "kdscale cache" in msg


def test_writer_rejects_bad_arguments_and_rows_and_keeps_nothing_of_them(tmp_path):
    with pytest.raises(CacheError, match="'dtype'"):
        CacheWriter(tmp_path / "c", num_outputs=5, dtype="fp16", **META)
    with pytest.raises(CacheError, match="'k'"):
        CacheWriter(tmp_path / "c", num_outputs=5, kind="topk", **META)
    assert not (tmp_path / "c").exists()
    with CacheWriter(tmp_path, num_outputs=3, shard_rows=100, **META) as w:
        w.add(torch.tensor([1, 2]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="example id 2 was added twice"):
            w.add(torch.tensor([5, 2]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="example id 7 appears twice in one shard"):
            w.add(torch.tensor([7, 7]), torch.zeros(2, 3))
        with pytest.raises(CacheError, match="4 columns, expected num_outputs=3"):
            w.add(torch.tensor([8]), torch.zeros(1, 4))
        with pytest.raises(CacheError, match=r"not finite for example ids \[10\]"):
            w.add(torch.tensor([10, 11]), torch.tensor([[0, 1, 1], [1, 1, 1.0]]).log())
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


def write_plan(directory, plan, ids, logits, shard_indices):
    for i in shard_indices:
        write_shard(directory, i, example_ids=ids[plan[i]], logits=logits[plan[i]], **SHARD)


def test_two_ranks_give_the_cache_one_rank_gives(tmp_path):
    ids, logits = dense_rows(n=23)
    plan = [slice(0, 7), slice(7, 14), slice(14, 21), slice(21, 23)]
    with ThreadPoolExecutor(2) as ranks:  # rank r writes shards r, r + 2, ... concurrently
        list(ranks.map(lambda r: write_plan(tmp_path / "two", plan, ids, logits, [r, r + 2]),
                       [1, 0]))
    write_plan(tmp_path / "one", plan, ids, logits, range(4))
    for name in ("two", "one"):
        finalize_cache(tmp_path / name, num_shards=4, **FINAL)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["manifest.json"] + [f"shard-0000{i}.safetensors" for i in range(4)]
    for name in files:  # the same bytes, whatever the world size
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    cache = LogitCache(tmp_path / "two")
    assert cache.manifest.num_rows == cache.manifest.num_examples == 23
    assert_bits_equal(cache.get(ids.flip(0)), logits.flip(0))


def test_only_shards_with_a_matching_sidecar_are_finished(tmp_path):
    ids, logits = dense_rows(n=12)
    plan = [slice(0, 4), slice(4, 8), slice(8, 12)]
    write_plan(tmp_path, plan, ids, logits, range(3))
    assert sorted(finished_shards(tmp_path, "plan-a")) == [0, 1, 2]
    (tmp_path / "shard-00001.json").unlink()  # killed between the shard and its sidecar
    (tmp_path / ".shard-00003.safetensors.k1ll3d.tmp").write_bytes(b"half a shard")
    sidecar = json.loads((tmp_path / "shard-00002.json").read_text())
    (tmp_path / "shard-00002.json").write_text(json.dumps({**sidecar, "bytes": 1}))
    assert list(finished_shards(tmp_path, "plan-a")) == [0]
    with pytest.raises(CacheError, match=r"shard\(s\) \[1, 2\] of 3 are not finished"):
        finalize_cache(tmp_path, num_shards=3, **FINAL)
    assert not (tmp_path / "manifest.json").exists()

    write_plan(tmp_path, plan, ids, logits, [1, 2])  # the resumed run
    finalize_cache(tmp_path, num_shards=3, **FINAL)
    names = sorted(p.name for p in tmp_path.iterdir())  # sidecars and tmp files are gone
    assert names == ["manifest.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    assert_bits_equal(LogitCache(tmp_path).get(ids), logits)


def test_an_id_in_two_shards_is_refused(tmp_path):
    ids, logits = dense_rows(n=12)
    write_plan(tmp_path, [slice(0, 7), slice(6, 12)], ids, logits, [0, 1])
    with pytest.raises(CacheError, match=rf"example id {int(ids[6])} appears more than once "
                                         r"\(in shard-00000.safetensors and shard-00001"):
        finalize_cache(tmp_path, num_shards=2, **FINAL)
    assert not (tmp_path / "manifest.json").exists()


def test_another_plans_shards_need_overwrite(tmp_path):
    ids, logits = dense_rows(n=8)
    write_plan(tmp_path, [slice(0, 4), slice(4, 8)], ids, logits, [0, 1])
    (tmp_path / "shard-00001.json").unlink()
    for _ in range(2):  # a sidecar of plan-a, then only a bare shard, known by its header
        with pytest.raises(CacheError, match=r"partial cache of a different plan \(different "
                                             r"data, teacher or settings\).*overwrite"):
            finished_shards(tmp_path, "plan-b")
        for name in ("shard-00000.json", "shard-00000.safetensors"):
            (tmp_path / name).unlink(missing_ok=True)
    assert finished_shards(tmp_path, "plan-a") == {}  # plan-a's, but not finished
    (tmp_path / "notes.txt").write_text("not the cache's")
    clear_partial(tmp_path)  # what overwrite does
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert finished_shards(tmp_path, "plan-b") == {}


def test_write_shard_refuses_bad_rows_before_writing(tmp_path):
    logits = torch.zeros(5, 5)
    logits[1, 0], logits[3, 2] = float("nan"), float("inf")
    with pytest.raises(CacheError, match=r"teacher logits are not finite for example ids "
                                         r"\[17, 230\] \(2 rows\)"):
        write_shard(tmp_path, 0, example_ids=[5, 17, 6, 230, 8], logits=logits, **SHARD)
    topk = {"values": torch.zeros(3, 2), "indices": torch.zeros(3, 2, dtype=torch.long),
            "dtype": "float16", "num_outputs": 5, "k": 2, "plan_id": "p"}
    with pytest.raises(CacheError, match="example id 4 appears twice.*contiguous"):
        write_shard(tmp_path, 0, example_ids=[4, 9, 4], positions=[1, 2, 3], **topk)
    with pytest.raises(CacheError, match="example id 9 appears twice.*empty_ids"):
        write_shard(tmp_path, 0, example_ids=[4, 9, 9], positions=[1, 2, 3], empty_ids=[9],
                    **topk)
    with pytest.raises(CacheError, match=r"top-k values overflow float16 for example ids \[9\]"):
        write_shard(tmp_path, 0, example_ids=[4, 9, 9], positions=[1, 2, 3],
                    **{**topk, "values": torch.tensor([[0.0, 0], [1e5, 0], [0, 1e6]])})
    with pytest.raises(CacheError, match="10 is outside"):
        write_shard(tmp_path, 0, example_ids=[1], **{**topk, "values": torch.zeros(1, 2),
                    "indices": torch.tensor([[1, 10]]), "num_outputs": 10})
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("writer", ["write_shard", "CacheWriter"])
def test_per_position_topk_round_trip(tmp_path, writer):
    ids, counts, rows_of = masked_rows()
    if writer == "write_shard":
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

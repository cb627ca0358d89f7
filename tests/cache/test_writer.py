"""Writing a logit cache: CacheWriter and write_shard refusing bad rows, overwrite, several ranks
writing one cache, the sidecars a resumed run trusts, and finalize_cache."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kdscale.cache import (
    CacheError,
    CacheWriter,
    LogitCache,
    clear_partial,
    finalize_cache,
    finished_shards,
    write_shard,
)
from tests.support.cache import META, assert_bits_equal, dense_rows, write_dense

SHARD = {"dtype": "float32", "num_outputs": 5, "plan_id": "plan-a"}  # write_shard settings
FINAL = {"kind": "dense", "num_outputs": 5, "k": None, "dtype": "float32", "plan_id": "plan-a",
         **META}  # finalize_cache settings of the same plan


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

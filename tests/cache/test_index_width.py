"""Top-k indices in the narrowest width the outputs need: uint16 up to 65,535 outputs (65535
marks padding), int32 beyond; caches written before the width was recorded (int32) still
read, and a manifest that names another width than its shards hold is refused."""

import json

import pytest
import torch

from kdscale.cache import CacheError, CacheWriter, LogitCache
from kdscale.cache.format import read_header
from kdscale.cache.sizes import PER_EXAMPLE_BYTES, row_bytes
from tests.support.cache import META


def topk_rows(n: int, k: int, vocab: int, seed: int = 0):
    """Sorted values and indices [n, k] with padding slots, and the largest and smallest id."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g).sort(dim=1, descending=True).values
    indices = torch.randint(0, vocab, (n, k), generator=g)
    indices[0, 0], indices[1, 0] = vocab - 1, 0  # the widest and narrowest ids round-trip
    indices[2, 1:] = -1
    values[2, 1:] = -1e4  # finite padding: verify() reads every slot
    return torch.arange(n) * 7, values, indices


def write(directory, vocab, k=4, n=9, **settings):
    ids, values, indices = topk_rows(n, k, vocab)
    with CacheWriter(directory, kind="topk", k=k, num_outputs=vocab, dtype="float32",
                     shard_rows=4, **META, **settings) as writer:
        writer.add(ids, values=values, indices=indices)
    return ids, values, indices


def index_code(directory) -> str:
    shard = directory / "shard-00000.safetensors"
    return read_header(shard, shard.stat().st_size)[1]["indices"]["dtype"]


@pytest.mark.parametrize("vocab, width, code", [
    (30522, "uint16", "U16"), (65535, "uint16", "U16"), (65536, "int32", "I32")])
def test_indices_round_trip_exactly_in_the_narrowest_width(tmp_path, vocab, width, code):
    ids, values, indices = write(tmp_path, vocab)
    cache = LogitCache(tmp_path)
    assert cache.manifest.index_dtype == width and index_code(tmp_path) == code
    order = [8, 2, 0, 1, 5]
    got = cache.get_topk(ids[order])
    assert got.indices.dtype == torch.int64  # what torch.gather takes
    assert torch.equal(got.indices, indices[order])  # padding comes back as -1
    assert got.indices[2, 0] == vocab - 1 and got.indices[3, 0] == 0  # rows 0 and 1
    assert torch.equal(got.values[got.indices >= 0], values[order][indices[order] >= 0])
    cache.verify()


def test_an_old_int32_cache_without_the_field_still_reads(tmp_path):
    ids, _, indices = write(tmp_path, 30522, index_dtype="int32")
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    assert raw.pop("index_dtype") == "int32"  # as written before the width was recorded
    path.write_text(json.dumps(raw))
    cache = LogitCache(tmp_path)
    assert index_code(tmp_path) == "I32" and cache.manifest.index_dtype is None
    assert torch.equal(cache.get_topk(ids).indices, indices)


@pytest.mark.parametrize("claimed, held", [("uint16", "int32"), ("int32", None)])
def test_a_manifest_naming_another_width_than_its_shards_is_refused(tmp_path, claimed, held):
    write(tmp_path, 30522, index_dtype=held)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "index_dtype": claimed}))
    code = {"uint16": "U16", "int32": "I32"}[claimed]
    with pytest.raises(CacheError, match=rf"shard shard-00000\.safetensors: tensor 'indices' "
                                         rf"is missing or is not {code} .*index_dtype "
                                         rf"'{claimed}'"):
        LogitCache(tmp_path)


def test_a_width_too_narrow_for_the_outputs_is_refused(tmp_path):
    with pytest.raises(CacheError, match=r"'index_dtype': expected one of \['uint16', 'int32'\]"
                                         r" \(uint16 only for up to 65535 outputs; num_outputs "
                                         r"is 70000\), got 'uint16'"):
        write(tmp_path, 70000, index_dtype="uint16")
    assert not list(tmp_path.glob("shard-*"))


@pytest.mark.parametrize("dtype, index_dtype, tail", [
    ("float16", "int32", False), ("float16", None, False), ("int8", None, False),
    ("float16", None, True), ("int8", None, True), ("bfloat16", None, False)])
def test_per_position_bytes_match_the_formula(tmp_path, dtype, index_dtype, tail):
    """The tensors of every shard take rows x row_bytes + examples x 12 bytes exactly."""
    n, k, vocab = 13, 5, 30522
    _, values, indices = topk_rows(n, k, vocab)
    example_ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5])  # 6 examples
    with CacheWriter(tmp_path, kind="topk", k=k, num_outputs=vocab, dtype=dtype, shard_rows=5,
                     index_dtype=index_dtype, tail_temperature=1.0 if tail else None,
                     **META) as writer:
        writer.add(example_ids, values=values, indices=indices, positions=torch.arange(n),
                   tail=torch.rand(n) if tail else None)
    data = 0
    for shard in tmp_path.glob("shard-*.safetensors"):
        start, _ = read_header(shard, shard.stat().st_size)
        data += shard.stat().st_size - start
    per_row = row_bytes(kind="topk", num_outputs=vocab, k=k, dtype=dtype,
                        index_dtype=index_dtype, per_position=True, tail=tail)
    assert data == n * per_row + 6 * PER_EXAMPLE_BYTES
    value = {"float16": 2, "bfloat16": 2, "int8": 1}[dtype]
    index = 4 if index_dtype == "int32" else 2
    assert per_row == k * (value + index) + 12 + 4 * (dtype == "int8") + 4 * tail

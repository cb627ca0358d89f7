"""`cache.verify` reads the raw bits of the stored teacher values: NaN and both infinities are
found in every storage dtype, the largest finite values are not mistaken for them."""

import pytest
import torch
from safetensors.torch import load_file, save

from kdscale.cache import finalize_cache, write_shard
from kdscale.cache.format import read_manifest
from kdscale.cache.verify import damaged_shards
from tests.support.bad_input import rewrite_shard

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _cache(directory, dtype: str, poison: float | None):
    """Two shards of 3 rows; with `poison`, one value of shard 1 replaced after the fact (the
    writer refuses non-finite logits), the manifest kept consistent with the new bytes."""
    logits = torch.randn(6, 5)
    logits[0, 0] = torch.finfo(DTYPES[dtype]).max  # the largest finite value is finite
    logits[1, 1] = torch.finfo(DTYPES[dtype]).min
    for index in range(2):
        write_shard(directory, index, example_ids=torch.arange(3 * index, 3 * index + 3),
                    logits=logits[3 * index:3 * index + 3], dtype=dtype, num_outputs=5,
                    plan_id="p")
    finalize_cache(directory, num_shards=2, plan_id="p", kind="dense", num_outputs=5, k=None,
                   dtype=dtype, teacher={}, tokenizer_sha256=None, data_fingerprint="d")
    if poison is not None:
        shard = load_file(directory / "shard-00001.safetensors")
        shard["logits"][1, 3] = poison
        rewrite_shard(directory, 1, save(shard))
    return read_manifest(directory)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_found_in_their_shard(tmp_path, dtype, poison):
    manifest = _cache(tmp_path, dtype, poison)
    assert damaged_shards(tmp_path, manifest) == {
        1: "it holds NaN or infinite teacher values"}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_extreme_finite_values_pass(tmp_path, dtype):
    assert damaged_shards(tmp_path, _cache(tmp_path, dtype, None)) == {}

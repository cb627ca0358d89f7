"""Shared by the cache tests: metadata, rows and a writer loop."""

import torch

from kdscale.cache import CacheWriter

META = {"teacher": {"name": "bert-large-sst2", "weights_sha256": "a" * 64},
        "tokenizer_sha256": "b" * 64, "data_fingerprint": "sst2-train-maxlen128-seed0"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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

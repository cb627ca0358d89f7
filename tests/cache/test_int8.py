"""int8 teacher values (cache.dtype int8): per-row codes dequantize within half their row's
scale, a student's loss from an int8 cache stays near the float16 cache's, the row offsets and
scales are finite-checked, and the audit measures what int8 adds."""

import json

import pytest
import torch
from kdscale.kernels import kd_loss_reference

from kdscale.cache import CacheError, CacheWriter, LogitCache
from kdscale.cache.audit import FidelityAudit, describe
from kdscale.cache.format import read_header
from kdscale.cache.quantize import dequantize_rows, quantize_rows
from kdscale.files import sha256_file
from tests.support.cache import META


def teacher_rows(n=64, vocab=500, spread=4.0, seed=0):
    """Peaked teacher logits [n, vocab], like a masked LM's."""
    g = torch.Generator().manual_seed(seed)
    return spread * torch.randn(n, vocab, generator=g)


@pytest.mark.parametrize("spread", [1e-3, 1.0, 30.0, 3000.0])
def test_codes_dequantize_within_half_a_step_of_their_row(spread):
    values = (spread * torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) + 7.0)
    values = values.sort(dim=1, descending=True).values
    valid = torch.ones_like(values, dtype=torch.bool)
    valid[3, 5:] = False  # padding slots: left out of the row's range
    values[3, 5:] = float("-inf")
    valid[4] = False  # a row of padding alone
    stored = quantize_rows(values, valid)
    assert stored["values"].dtype == torch.int8 and stored["values_scale"].dtype == torch.float16
    got = dequantize_rows(stored["values"], stored["values_offset"], stored["values_scale"])
    bound = stored["values_scale"].float()[:, None] / 2  # [R, 1], as the module states
    error = (got - values).abs()
    assert (error[valid] <= (bound.expand_as(error)[valid] * (1 + 1e-5) + 1e-6)).all()
    assert (stored["values"][~valid] == -128).all()
    # the grid is no coarser than the module states: about (hi - lo) / 254 a step
    hi = torch.where(valid, values, -torch.inf).amax(dim=1)[valid.any(dim=1)]
    lo = torch.where(valid, values, torch.inf).amin(dim=1)[valid.any(dim=1)]
    most = ((hi - lo) / 2 + (hi + lo).abs() / 2 * 2**-11) / 127 * (1 + 2**-10) + 2**-24
    assert (stored["values_scale"].float()[valid.any(dim=1)] <= most).all()


def write(directory, logits, k, dtype):
    values, indices = logits.topk(k, dim=-1)
    ids = torch.arange(len(logits))
    with CacheWriter(directory, kind="topk", k=k, num_outputs=logits.shape[1], dtype=dtype,
                     shard_rows=24, **META) as writer:
        writer.add(ids, values=values, indices=indices)
    return LogitCache(directory), ids


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_students_loss_from_an_int8_cache_is_within_0_1_percent_of_float16(tmp_path,
                                                                             temperature):
    logits = teacher_rows()
    student = teacher_rows(seed=2).requires_grad_(True)
    losses, grads = {}, {}
    for dtype in ("float16", "int8"):
        cache, ids = write(tmp_path / dtype, logits, k=32, dtype=dtype)
        topk = cache.get_topk(ids)
        loss = kd_loss_reference(student, teacher_topk_values=topk.values.float(),
                                 teacher_topk_indices=topk.indices, temperature=temperature,
                                 alpha=1.0)  # the soft term alone: what int8 changes
        losses[dtype], (grads[dtype],) = loss.item(), torch.autograd.grad(loss, student)
    # measured: 1e-4 and 2.3e-3 (top 32 of 500 outputs, logits of std 4)
    assert abs(losses["int8"] / losses["float16"] - 1) < 1e-3
    assert (grads["int8"] - grads["float16"]).norm() / grads["float16"].norm() < 1e-2


def test_an_int8_cache_reads_back_its_rows_in_request_order(tmp_path):
    logits = teacher_rows(n=50)
    cache, _ = write(tmp_path, logits, k=8, dtype="int8")
    assert cache.manifest.dtype == "int8"
    want = [49, 3, 24, 0]
    got = cache.get_topk(want)
    values, indices = logits[want].topk(8, dim=-1)
    assert got.values.dtype == torch.float32 and torch.equal(got.indices, indices)
    span = values[:, :1] - values[:, -1:]
    assert ((got.values - values).abs() <= span / 254 * 0.5 * 1.01 + 1e-6).all()
    cache.verify()


def test_verify_finds_a_row_scale_that_is_not_finite(tmp_path):
    cache, _ = write(tmp_path, teacher_rows(n=10), k=4, dtype="int8")
    shard = tmp_path / cache.manifest.shards[0]["file"]
    start, header = read_header(shard, shard.stat().st_size)
    data = bytearray(shard.read_bytes())
    begin = start + header["values_scale"]["data_offsets"][0]
    data[begin:begin + 2] = torch.tensor([float("nan")], dtype=torch.float16).view(
        torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(data))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(shard)  # only the finiteness check is left
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="shard-00000.safetensors: it holds NaN or infinite"):
        LogitCache(tmp_path).verify()


def test_rows_whose_float16_grid_would_overflow_are_refused(tmp_path):
    logits = teacher_rows(n=6)
    logits[4] += 1e6  # a row around a million: its float16 offset is inf
    with pytest.raises(CacheError, match=r"overflow int8's float16 row offset or scale for "
                                         r"example ids \[4\].*store the cache as float32"):
        write(tmp_path, logits, k=4, dtype="int8")
    assert not list(tmp_path.glob("shard-*"))


def test_a_dense_int8_cache_is_refused(tmp_path):
    with pytest.raises(CacheError, match=r"'dtype': expected 'float16', 'bfloat16' or "
                                         r"'float32' for a dense cache"):
        CacheWriter(tmp_path, kind="dense", num_outputs=5, dtype="int8", **META)


@pytest.mark.parametrize("kind", ["topk", "topk_tail", "sampled"])
def test_the_audit_measures_what_int8_adds_and_float32_adds_nothing(kind):
    teacher = teacher_rows(n=48)
    stored = {}
    for dtype in ("float32", "int8"):
        audit = FidelityAudit(k=16, temperature=1.0, kind=kind, dtype=dtype)
        audit.add(teacher)
        stored[dtype] = audit.result()["stored"]
    assert stored["float32"]["loss_error"] == 0 and stored["float32"]["grad_error"] == 0
    assert 0 < stored["int8"]["grad_error"] < 1e-2 and stored["int8"]["loss_error"] < 1e-3
    assert stored["int8"]["kind"] == kind and stored["int8"]["dtype"] == "int8"
    assert "stored as int8" in describe(audit.result())

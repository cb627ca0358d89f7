"""The planner's memory model term by term: each term against its formula, DeepSpeed's
settings as DeepSpeed reads them, and where a GPU and a CPU differ (whole buffers against
written pages, offload to another memory against the same one)."""

from __future__ import annotations

import json

import pytest

from kdscale.commands.env import measured_runtime_bytes
from kdscale.plan.memory import GiB, device_total, zero_training_terms
from kdscale.plan.runtime import GPU_CONTEXT_BYTES, runtime_term
from kdscale.plan.stages import (
    PREFETCH_AHEAD_SHARE,
    MemoryInputs,
    Model,
    cache_stage,
    distill_stage,
    finetune_stage,
)
from kdscale.plan.zero import (
    DEFAULT_REDUCE_BUCKET,
    ZeroSettings,
    settings_from_dict,
    zero_settings,
)
from tests.support.pipeline import REPO

P, N = 1_000_000, 4  # parameters, processes
DEEPSPEED = REPO / "configs" / "deepspeed"


def by_name(terms) -> dict[str, float]:
    return {t.name: t.bytes for t in terms}


def test_settings_are_deepspeeds_defaults_unless_set_and_auto_scales_with_the_model():
    zero2 = zero_settings(DEEPSPEED / "zero2.json", hidden_size=768)
    assert (zero2.stage, zero2.reduce_bucket, zero2.overlap_comm) == (2, 50_000_000, True)
    zero3 = zero_settings(DEEPSPEED / "zero3.json", hidden_size=768)
    assert zero3.reduce_bucket == DEFAULT_REDUCE_BUCKET  # unset: DeepSpeed's 5e8 elements
    assert zero3.overlap_comm  # DeepSpeed's default under ZeRO-3 only
    assert not zero_settings(DEEPSPEED / "zero1.json", 768).overlap_comm
    auto = settings_from_dict({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}}, hidden_size=1024)
    assert auto.reduce_bucket == 1024 * 1024
    assert auto.prefetch_bucket == int(0.9 * 1024 * 1024)
    assert auto.persistence_threshold == 10 * 1024
    offload = zero_settings(DEEPSPEED / "zero3_offload.json", 768)
    assert offload.offload_optimizer and offload.offload_params
    assert zero_settings(None, 768) == ZeroSettings()  # no DeepSpeed


@pytest.mark.parametrize("stage, expected", [
    # fp32: weights, fp32 master copy, Adam moments, gradients, and one reduce bucket that
    # on a CPU costs only the gradients written into it (ZeRO-1 accumulates in fp32).
    (1, {"weights": 4 * P, "fp32 master weights": 4 * P / N, "Adam moments": 8 * P / N,
         "gradients": 4 * P, "fp32 gradient partition": 4 * P / N, "reduce buckets": 4 * P}),
    (2, {"weights": 4 * P, "fp32 master weights": 4 * P / N, "Adam moments": 8 * P / N,
         "gradient partition": 4 * P / N, "reduce buckets": 4 * P}),
    (3, {"weights": 4 * P / N, "fp32 master weights": 4 * P / N, "Adam moments": 8 * P / N,
         "gradient partitions": 8 * P / N, "reduce buckets": 4 * P}),
])
def test_training_state_per_zero_stage_in_fp32_on_a_cpu(stage, expected):
    zero = ZeroSettings(stage=stage)
    assert by_name(zero_training_terms(P, "no", zero, N, "cpu")) == pytest.approx(expected)


def test_a_gpu_pays_for_whole_buckets_and_two_with_overlap():
    zero = ZeroSettings(stage=2, reduce_bucket=50_000_000, overlap_comm=True)
    gpu = by_name(zero_training_terms(P, "bf16", zero, N, "gpu"))
    cpu = by_name(zero_training_terms(P, "bf16", zero, N, "cpu"))
    assert gpu["reduce buckets"] == 2 * 50_000_000 * 2  # two bf16 buckets, allocated whole
    assert cpu["reduce buckets"] == 2 * P * 2  # only what the gradients wrote
    assert gpu["weights"] == 2 * P and gpu["fp32 master weights"] == 4 * P / N


def test_offload_moves_state_off_a_gpu_but_not_off_a_cpu():
    # A bucket smaller than the model costs the same on both devices.
    zero = ZeroSettings(stage=3, offload_optimizer=True, offload_params=True,
                        reduce_bucket=P // 2)
    gpu = zero_training_terms(P, "bf16", zero, N, "gpu")
    cpu = zero_training_terms(P, "bf16", zero, N, "cpu")
    host = {t.name for t in gpu if t.where == "host"}
    assert host == {"weights", "fp32 master weights", "Adam moments"}
    assert device_total(cpu) == pytest.approx(sum(t.bytes for t in gpu))  # nothing moved
    assert device_total(gpu) == pytest.approx(device_total(cpu) - (2 + 4 + 8) * P / N)


def inputs(**changes) -> MemoryInputs:
    bert = Model(params=335_000_000, layers=24, hidden=1024, heads=16, vocab=30522)
    student = Model(params=108_000_000, layers=6, hidden=1024, heads=16, vocab=30522)
    teacher_zero = settings_from_dict(json.loads((DEEPSPEED / "teacher_zero3.json")
                                                 .read_text()), 1024)
    base = dict(device="cpu", world=2, max_length=64, teacher=bert, student=student,
                teacher_dtype="fp32", placement="replicate", source="cache",
                teacher_zero=teacher_zero, finetune_zero=ZeroSettings(stage=3),
                student_zero=ZeroSettings(stage=3), finetune_precision="no",
                distill_precision="no", cache_batch=16, finetune_batch=4, distill_batch=16)
    return MemoryInputs(**{**base, **changes})


RUNTIME = runtime_term("cpu", 0.5)


def test_a_replica_holds_the_teacher_and_a_zero3_shard_a_share_of_it():
    replica = by_name_dicts(cache_stage(inputs(), RUNTIME))
    assert replica["teacher weights"] == 335_000_000 * 4
    sharded = by_name_dicts(cache_stage(inputs(placement="zero3"), RUNTIME))
    assert sharded["teacher shard"] == 335_000_000 * 4 / 2
    embeddings = 30522 * 1024  # the largest tensor, gathered (and copied by gloo on a CPU)
    assert sharded["gathered layer"] == 2 * embeddings * 4
    assert sharded["prefetched layers"] == pytest.approx(PREFETCH_AHEAD_SHARE * 335e6 * 4)
    no_prefetch = cache_stage(inputs(placement="zero3", teacher_zero=ZeroSettings(
        stage=3, prefetch_bucket=0)), RUNTIME)
    assert "prefetched layers" not in by_name_dicts(no_prefetch)


def test_zero3_offload_on_a_cpu_is_not_free():
    zero3 = cache_stage(inputs(placement="zero3"), RUNTIME)
    offload = cache_stage(inputs(placement="zero3_offload"), RUNTIME)
    assert offload["total"] == pytest.approx(zero3["total"])
    forward = sum(t["bytes"] for t in zero3["terms"])
    on_gpu = cache_stage(inputs(placement="zero3_offload", device="gpu"), RUNTIME)
    # the shard goes to host memory; NCCL gathers without gloo's extra copy
    assert on_gpu["total"] == pytest.approx(forward - 335_000_000 * 4 / 2 - 30522 * 1024 * 4)
    shard = next(t for t in on_gpu["terms"] if t["name"] == "teacher shard")
    assert shard["where"] == "host"


def test_a_zero3_teacher_on_a_cpu_peaks_where_the_main_process_reads_the_checkpoint():
    stage = cache_stage(inputs(placement="zero3"), RUNTIME)
    load = by_name_dicts({"terms": stage["load_terms"]})
    assert load["teacher checkpoint"] == 4 * 335_000_000
    assert load["teacher shard"] == 335_000_000 * 4 / 2
    forward = sum(t["bytes"] for t in stage["terms"])
    assert stage["total"] == pytest.approx(max(forward, sum(load.values())))
    assert stage["total"] > forward  # BERT-large: the whole checkpoint outweighs the forward
    assert cache_stage(inputs(), RUNTIME)["load_terms"] == []  # a replica reads its own
    assert cache_stage(inputs(placement="zero3", device="gpu"), RUNTIME)["load_terms"] == []


def test_distill_peaks_at_its_load_when_the_teacher_outweighs_the_student_state():
    """A 24-layer teacher read whole to copy 1 layer out of it: the load is the peak."""
    tiny = Model(params=40_000_000, layers=1, hidden=1024, heads=16, vocab=30522)
    stage = distill_stage(inputs(student=tiny), RUNTIME)
    load = sum(t["bytes"] for t in stage["load_terms"])
    assert stage["total"] == load == pytest.approx(0.5 * GiB + 4 * 335e6 + 4 * 40e6)
    on_gpu = distill_stage(inputs(student=tiny, device="gpu"), RUNTIME)
    assert on_gpu["load_terms"] == []  # read in host memory, not the GPU's


def test_the_runtime_is_measured_on_a_cpu_and_stated_on_a_gpu():
    assert runtime_term("gpu").bytes == GPU_CONTEXT_BYTES
    assert runtime_term("cpu", stated_gib=1.5).bytes == 1.5 * GiB
    measured = measured_runtime_bytes()  # kdscale's commands and their libraries imported
    term = runtime_term("cpu", measured_bytes=measured)
    assert term.bytes == measured and "measured" in term.why
    assert 0.1 * GiB < measured < 4 * GiB


def by_name_dicts(stage: dict) -> dict[str, float]:
    return {t["name"]: t["bytes"] for t in stage["terms"]}


def test_a_zero3_save_gathers_the_weights_and_safetensors_copies_them():
    """The main process at the end of fine-tuning: the state it keeps, less the step's
    activations and gathered weights, plus two full copies of the weights."""
    stage = finetune_stage(inputs(), RUNTIME)
    run, save = (by_name_dicts({"terms": stage[k]}) for k in ("terms", "save_terms"))
    assert set(run) - set(save) == {"activations", "gathered weights"}
    assert save["weights gathered to save"] == save["serialized copy"] == 335_000_000 * 4
    assert stage["total"] == pytest.approx(max(sum(run.values()), sum(save.values())))
    assert finetune_stage(inputs(device="gpu"), RUNTIME)["save_terms"] == []

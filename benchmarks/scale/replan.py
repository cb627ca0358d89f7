"""A job's memory prediction re-derived from its results record: the planner's current
model applied to the numbers the job's `kdscale env` recorded. A record from before the plan
carried its `memory_inputs` (the first probe's) is completed from the benchmark's settings:
the teacher's shape, the sequence length and the cache's batch."""

from __future__ import annotations

from pathlib import Path

from benchmarks.scale.teacher import BERT_LARGE
from kdscale.plan.estimates import teacher_zero_settings
from kdscale.plan.memory import Term
from kdscale.plan.stages import (
    MemoryInputs,
    Model,
    cache_stage,
    distill_stage,
    finetune_stage,
)
from kdscale.plan.zero import zero_settings

REPO = Path(__file__).resolve().parents[2]
STAGES = {"cache": cache_stage, "finetune": finetune_stage, "distill": distill_stage}


def stage_of(job: dict) -> str:
    return job["job"].split("-", 1)[0]


def memory_inputs(job: dict, settings: dict) -> MemoryInputs:
    plan = job["plan"]
    if "memory_inputs" in plan:
        return MemoryInputs.from_dict(plan["memory_inputs"])
    sizes, teacher, launch = plan["sizes"], plan["teacher"], plan["launch"]
    shape = {**BERT_LARGE, **settings.get("teacher_shape", {})}
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    ds_file = launch["deepspeed_file"] and REPO / launch["deepspeed_file"]
    precision = settings.get("precision", "fp32")
    return MemoryInputs(
        device="cpu", world=launch["world_size"], max_length=settings["max_length"],
        teacher=Model(sizes["teacher_params"], sizes["teacher_layers"], hidden,
                      shape["num_attention_heads"], vocab),
        student=Model(sizes["student_params"], sizes["student_layers"],
                      sizes["student_hidden"], sizes["student_heads"], vocab),
        teacher_dtype=teacher["dtype"], placement=teacher["placement"],
        source=teacher["source"],
        teacher_zero=teacher_zero_settings(teacher["placement"], hidden),
        finetune_zero=zero_settings(ds_file, hidden),
        student_zero=zero_settings(ds_file, sizes["student_hidden"]),
        finetune_precision="no" if precision == "fp32" else precision,
        distill_precision=launch["mixed_precision"],
        cache_batch=settings["cache"]["batch_size"],
        finetune_batch=plan["batches"]["finetune"]["per_device"],
        distill_batch=plan["batches"]["distill"]["per_device"])


def replanned(job: dict, settings: dict, runtime: Term) -> dict:
    """The stage's terms and peak per process under the planner's current model."""
    return STAGES[stage_of(job)](memory_inputs(job, settings), runtime)

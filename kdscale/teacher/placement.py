"""Where the teacher's weights live (its placement), chosen from its size and the memory free.

Placements: `replicate` keeps a full copy per process (fastest when it fits: no parameter
traffic); `zero3` shards the weights over processes with DeepSpeed ZeRO-3, which gathers each
layer for the forward pass, so every process must run the same number of forwards;
`zero3_offload` also keeps the shards in CPU memory; `auto` picks from the teacher's size
and the free memory per process, and says why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from kdscale import configs
from kdscale.config import Config, ConfigError, TeacherConfig
from kdscale.config.intermediate import intermediate_config
from kdscale.config.schedules import Schedule
from kdscale.models import parameters_in_config

DEEPSPEED_CONFIGS = {"zero3": "deepspeed/teacher_zero3.json",
                     "zero3_offload": "deepspeed/teacher_zero3_offload.json"}


# A replica must leave room for activations and the runtime: use at most this share of memory.
REPLICA_SHARE = 0.5


GiB = 1024**3


@dataclass
class Placement:
    name: str  # replicate | zero3 | zero3_offload
    reason: str


def teacher_source(config: Config) -> str:
    """Where the teacher's outputs come from: "cache", "online", or "none" for a hard-label
    run (alpha 0 throughout, no loss beyond logits), which reads no teacher output at all."""
    soft = Schedule.from_value(config.loss.alpha).bounds()[1] > 0
    return config.teacher.source if soft or intermediate_config(config.loss).enabled else "none"


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def parameter_count(checkpoint: str | Path, model_class=AutoModelForSequenceClassification) -> int:
    """The teacher's parameters, counted from its saved config alone (no weights read)."""
    return parameters_in_config(AutoConfig.from_pretrained(str(checkpoint)), model_class)


def free_memory_per_process(local_processes: int) -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return psutil.virtual_memory().available // max(local_processes, 1)


def choose_placement(requested: str, weight_bytes: int, free_bytes: int,
                     world_size: int) -> Placement:
    if requested != "auto":
        return Placement(requested, "set by teacher.placement")
    sizes = f"weights {weight_bytes / GiB:.2f} GiB, {free_bytes / GiB:.1f} GiB free per process"
    if weight_bytes <= REPLICA_SHARE * free_bytes:
        return Placement("replicate", f"{sizes}: a full copy fits with room for activations, "
                                      f"and replicas need no parameter traffic")
    if world_size > 1 and weight_bytes / world_size <= REPLICA_SHARE * free_bytes:
        return Placement("zero3", f"{sizes}: a copy does not fit, a 1/{world_size} ZeRO-3 "
                                  f"shard does")
    return Placement("zero3_offload", f"{sizes}: even a 1/{world_size} shard does not fit on "
                                      f"the device; shards live in CPU memory")


def deepspeed_config(cfg: TeacherConfig, placement: str, batch_size: int,
                     dtype: torch.dtype, hidden_size: int) -> dict:
    """The teacher's DeepSpeed config with its "auto" values filled, as Accelerate would."""
    from kdscale.config.deepspeed import check_deepspeed_config, read_deepspeed_config

    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else configs.path(
        DEEPSPEED_CONFIGS[placement])
    ds = read_deepspeed_config(path, "teacher.deepspeed_config")
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if zero.get("stage3_prefetch_bucket_size") == "auto":
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    check_deepspeed_config(ds, f"teacher DeepSpeed config {path}")
    unfilled = [key for key, value in _leaves(ds) if value == "auto"]
    if unfilled:
        raise ConfigError(f"{path}: kdscale cannot fill {unfilled} for the teacher; "
                          f"set them to values")
    return ds


def check_teacher_deepspeed_config(cfg: TeacherConfig) -> None:
    """A teacher.deepspeed_config is read only when the teacher loads, after a cache job has
    prepared its directory: checked at start instead."""
    if cfg.deepspeed_config is not None and cfg.placement != "replicate":
        from kdscale.config.deepspeed import check_deepspeed_config

        check_deepspeed_config(cfg.deepspeed_config, "teacher.deepspeed_config")


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

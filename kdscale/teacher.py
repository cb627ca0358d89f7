"""The teacher at inference time: where its weights live (its placement) and a runner that
computes its logits on this process.

Placements: `replicate` keeps a full copy per process (fastest when it fits: no parameter
traffic); `zero3` shards the weights over processes with DeepSpeed ZeRO-3, which gathers each
layer for the forward pass, so every process must run the same number of forwards;
`zero3_offload` also keeps the shards in CPU memory; `auto` picks from the teacher's size
and the free memory per process, and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from kdscale import configs
from kdscale.config import Config, ConfigError, TeacherConfig
from kdscale.distributed import free_port
from kdscale.intermediate import intermediate_config
from kdscale.schedules import Schedule
from kdscale.tasks import get_task

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
    """The teacher's parameters, counted from its config on the meta device (no weights read)."""
    config = AutoConfig.from_pretrained(str(checkpoint))
    with torch.device("meta"):
        model = model_class.from_config(config)
    return sum(p.numel() for p in model.parameters())


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
    from kdscale.deepspeed_config import check_deepspeed_config, read_deepspeed_config

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
        from kdscale.deepspeed_config import check_deepspeed_config

        check_deepspeed_config(cfg.deepspeed_config, "teacher.deepspeed_config")


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class TeacherRunner:
    """Loads a fine-tuned teacher in its placement and computes logits on this process."""

    def __init__(self, checkpoint: str | Path, placement: str, dtype: torch.dtype,
                 ds_config: dict | None, num_params: int,
                 attn_implementation: str | None = None,
                 model_class=AutoModelForSequenceClassification):
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        self.placement, self.dtype, self.num_params = placement, dtype, num_params
        options = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if placement == "replicate":
            model = model_class.from_pretrained(str(checkpoint), **options)
            self.model = model.to(self.device, dtype).eval()
        else:
            self.model = _zero3_model(checkpoint, dtype, ds_config, options, model_class)

    @property
    def params_held(self) -> int:
        """Parameter elements stored on this process (a ZeRO-3 shard, or the full model)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.model.parameters())

    @torch.inference_mode()
    def logits(self, batch: dict) -> torch.Tensor:
        return self.outputs(batch).logits.float().cpu()

    @torch.no_grad()
    def outputs(self, batch: dict, **flags):
        """The teacher's model outputs on this device (hidden states, attentions on request).
        no_grad rather than inference_mode: a student's loss may still use them."""
        inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask",
                                                        "token_type_ids") if k in batch}
        return self.model(**inputs, **flags)


def load_runner(config: Config, state, batch_size: int,
                attn_implementation: str | None = None) -> TeacherRunner:
    """The fine-tuned teacher in its placement, chosen (and explained) now; `batch_size` is
    the rows of one forward on this process."""
    model_class = get_task(config.task).model_class
    dtype = compute_dtype(config.teacher.precision)
    num_params = parameter_count(config.teacher_dir, model_class)
    weight_bytes = num_params * torch.finfo(dtype).bits // 8
    local_processes = state.num_processes // max(_num_machines(), 1)
    placement = choose_placement(config.teacher.placement, weight_bytes,
                                 free_memory_per_process(local_processes), state.num_processes)
    state.print(f"teacher placement: {placement.name} ({placement.reason})")
    ds_config = None
    if placement.name != "replicate":
        hidden = AutoConfig.from_pretrained(str(config.teacher_dir)).hidden_size
        ds_config = deepspeed_config(config.teacher, placement.name, batch_size, dtype, hidden)
    return TeacherRunner(config.teacher_dir, placement.name, dtype, ds_config, num_params,
                         attn_implementation, model_class)


def _num_machines() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world // local if local else 1


def _zero3_model(checkpoint: str | Path, dtype: torch.dtype, ds_config: dict, options: dict,
                 model_class):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    _ensure_process_group()
    # While this object lives, from_pretrained loads each weight straight into its ZeRO-3
    # shard: no process ever holds the whole teacher.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = model_class.from_pretrained(str(checkpoint), dtype=dtype, **options)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    del hf_ds_config
    return engine.module.eval()


def _ensure_process_group() -> None:
    """DeepSpeed needs a process group, even for a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)

"""The teacher at inference time: a runner that computes its logits on this process, in the
placement `kdscale.teacher.placement` chose."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from kdscale.config import Config
from kdscale.distributed import (
    free_port,
    processes_on_this_machine,
    return_large_blocks_when_freed,
)
from kdscale.models import checkpoint_errors
from kdscale.tasks import get_task
from kdscale.teacher.placement import (
    choose_placement,
    compute_dtype,
    deepspeed_config,
    free_memory_per_process,
    parameter_count,
)


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
        with checkpoint_errors(f"teacher checkpoint {checkpoint}"):
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
    local_processes = processes_on_this_machine(state.num_processes)
    placement = choose_placement(config.teacher.placement, weight_bytes,
                                 free_memory_per_process(local_processes), state.num_processes)
    state.print(f"teacher placement: {placement.name} ({placement.reason})")
    ds_config = None
    if placement.name != "replicate":
        hidden = AutoConfig.from_pretrained(str(config.teacher_dir)).hidden_size
        ds_config = deepspeed_config(config.teacher, placement.name, batch_size, dtype, hidden)
    return TeacherRunner(config.teacher_dir, placement.name, dtype, ds_config, num_params,
                         attn_implementation, model_class)


def _zero3_model(checkpoint: str | Path, dtype: torch.dtype, ds_config: dict, options: dict,
                 model_class):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    _ensure_process_group()
    return_large_blocks_when_freed()  # each forward gathers and frees every layer
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

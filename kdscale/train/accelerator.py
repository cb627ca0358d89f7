"""One Accelerator per command: batches split over processes, gradient accumulation windows
the loop forms itself, DeepSpeed's "auto" values filled from the training config."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed

from kdscale.config import TrainConfig
from kdscale.distributed import (
    process_state,
    return_large_blocks_when_freed,
    uses_deepspeed,
)
from kdscale.train.tracking import trackers


def make_accelerator(train: TrainConfig, seed: int, section: str = "train",
                     log_dir: Path | None = None) -> Accelerator:
    """One Accelerator per command. Batches are split: the loader yields global batches of
    `batch_size * processes` rows and each process takes its part, so the data order and
    every optimizer step's batch are the same whatever the number of processes. With
    `log_dir`, the trackers of `train.report_to` write there."""
    log_with = trackers(train.trackers, section) if log_dir is not None else None
    process_state()  # the Accelerator joins the process group created there
    accumulation = GradientAccumulationPlugin(
        num_steps=train.gradient_accumulation_steps,
        # Windows of exactly `num_steps` micro-batches are formed by the loop itself; an
        # epoch's end must not cut one short (the loop drops an incomplete tail instead).
        sync_with_dataloader=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not uses_deepspeed(),
                              mixed_precision=None if train.mixed_precision == "launch"
                              else train.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              gradient_accumulation_plugin=accumulation,
                              log_with=log_with, project_dir=log_dir)
    _fill_deepspeed_autos(accelerator, train)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:  # gathers churn large blocks
        return_large_blocks_when_freed()
    set_seed(seed)
    return accelerator


def _fill_deepspeed_autos(accelerator: Accelerator, train: TrainConfig) -> None:
    """"auto" values that Accelerate does not fill from its own arguments come from the
    training config, so each value is stated once."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    # Accelerate reads the micro-batch from the loader, but ours are built from a batch
    # sampler (length-grouped batches), which hides it.
    filled = {"train_micro_batch_size_per_gpu": train.batch_size,
              "gradient_clipping": train.max_grad_norm}
    for key, value in filled.items():
        if ds.get(key) == "auto":
            ds[key] = value
    plugin.gradient_clipping = ds.get("gradient_clipping")

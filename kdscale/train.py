"""The Accelerate training loop, shared by teacher fine-tuning and student distillation."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kdscale.config import TrainConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LossFn = Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]


def process_state() -> PartialState:
    """This process's place in the launch; the process group is created on first call.
    Without CUDA, Accelerate must be told both `cpu=True` and gloo: otherwise several
    launched processes each train alone (distributed type NO, no gradient all-reduce)."""
    if torch.cuda.is_available():
        return PartialState()
    if launched_distributed():
        return PartialState(cpu=True, backend="gloo")
    return PartialState(cpu=True)


def make_accelerator(train: TrainConfig, seed: int) -> Accelerator:
    process_state()  # the Accelerator joins the process group created there
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=train.mixed_precision,
                              gradient_accumulation_steps=train.gradient_accumulation_steps)
    set_seed(seed)
    return accelerator


def launched_distributed() -> bool:
    """Started by a launcher with more than one process (`accelerate launch`, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def total_optimizer_steps(train: TrainConfig, batches_per_epoch: int, num_processes: int) -> int:
    """Optimizer steps of the run; each process sees 1/num_processes of the batches (the last
    ones padded by Accelerate so every process steps the same number of times)."""
    batches_per_process = math.ceil(batches_per_epoch / num_processes)
    steps = math.ceil(train.epochs * batches_per_process / train.gradient_accumulation_steps)
    return min(steps, train.max_steps) if train.max_steps else steps


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as BERT was trained.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate)


def train_loop(model: torch.nn.Module, loader: torch.utils.data.DataLoader, loss_fn: LossFn,
               train: TrainConfig, accelerator: Accelerator, desc: str
               ) -> tuple[torch.nn.Module, list[dict]]:
    """Train `model` on `loader` with `loss_fn(model, batch) -> {"loss": ..., other parts}`.
    Returns the prepared model and the logged history (one record per `log_every` steps)."""
    total_steps = total_optimizer_steps(train, len(loader), accelerator.num_processes)
    optimizer = make_optimizer(model, train)
    # Accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler_steps = total_steps * accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(train.warmup_ratio * scheduler_steps), scheduler_steps)
    sampler = loader.batch_sampler
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    effective_batch = (train.batch_size * accelerator.num_processes
                       * train.gradient_accumulation_steps)
    accelerator.print(f"{desc}: {total_steps} optimizer steps, {accelerator.num_processes} "
                      f"process(es) ({accelerator.distributed_type.value}), "
                      f"effective batch {effective_batch}")
    history, window, step, epoch = [], [], 0, 0
    progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_local_main_process)
    start = time.perf_counter()
    model.train()
    while step < total_steps:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                parts = loss_fn(model, batch)
                accelerator.backward(parts["loss"])
                if accelerator.sync_gradients and train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append({k: v.detach().float() for k, v in parts.items()})
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % train.log_every == 0 or step == total_steps:
                record = _log_record(window, accelerator, step, epoch, start)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                history.append(record)
                window = []
            if step >= total_steps:
                break
        epoch += 1
    progress.close()
    return model, history


def _log_record(window: list[dict], accelerator: Accelerator, step: int, epoch: int,
                start: float) -> dict:
    """Mean of each loss part over the window and over processes (one sync per log line)."""
    means = {k: torch.stack([w[k] for w in window]).mean() for k in window[0]}
    means = {k: accelerator.reduce(v, reduction="mean").item() for k, v in means.items()}
    return {"step": step, "epoch": epoch, "seconds": round(time.perf_counter() - start, 2),
            **means}


def save_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory: Path,
               history: list[dict]) -> None:
    """Weights (safetensors), config, tokenizer and the training log, from the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))
        (directory / "training_log.json").write_text(json.dumps(history, indent=1))
    accelerator.wait_for_everyone()

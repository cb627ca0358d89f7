"""The Accelerate training loop, shared by teacher fine-tuning and student distillation.

A loss function returns sums over its valid rows (`loss` plus any parts to log). The loop
divides by the number of valid rows in the whole optimizer step (every micro-batch of the
accumulation window, on every process), not per micro-batch: a step's gradient is that of
the mean over all its rows, whatever the accumulation and the number of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from kdscale.config import ConfigError, TrainConfig
from kdscale.data.batch import valid_rows
from kdscale.distributed import reduce_sum
from kdscale.files import OutputError, replace_directory
from kdscale.train.checkpoint import (
    Progress,
    check_same_run,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from kdscale.train.guard import check_step_finite, check_weights_finite, divergence_hint
from kdscale.train.stopping import JobStopped, StopRequest
from kdscale.train.timing import StepTimer
from kdscale.train.tracking import flat_metrics

if TYPE_CHECKING:
    from kdscale.train.periodic_eval import PeriodicEval

# loss_fn(model, batch, timer) -> sums over the batch's valid rows; it times its own
# "teacher", "forward" and "loss" phases.
LossFn = Callable[[torch.nn.Module, dict, StepTimer], dict[str, torch.Tensor]]


def total_optimizer_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    steps = math.ceil(train.epochs * steps_per_epoch)
    return min(steps, train.max_steps) if train.max_steps else steps


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as BERT was trained.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # A ZeRO-3 parameter loaded into shards is an empty placeholder: its shape is ds_shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (no_decay if ndim < 2 else decay).append(param)
    # An empty group would be dropped by DeepSpeed, and the schedule then counts one too many.
    groups = [group for group in ({"params": decay, "weight_decay": train.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if group["params"]]
    # The fused kernel updates all parameters in one pass: about 5x faster than the default
    # per-tensor loops on a CPU (a 17M-parameter step: 33 ms against 161 ms), and the same
    # update rule.
    return torch.optim.AdamW(groups, lr=train.learning_rate, fused=True)


def train_loop(model: torch.nn.Module, loader: torch.utils.data.DataLoader, loss_fn: LossFn,
               train: TrainConfig, accelerator: Accelerator, desc: str,
               checkpoints: Path | None = None, evaluator: PeriodicEval | None = None,
               section: str = "train",
               identity: dict | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """Train `model` on `loader` (global batches; see make_accelerator). With `checkpoints`,
    save there every `train.checkpoint_every` steps and resume from the newest complete one;
    with `evaluator`, evaluate every `train.eval_every` steps and keep the best model.
    `section` names the config section of `train` in messages; `identity` (the settings that
    make this run what it is, flat {key: value}) is recorded in every
    checkpoint, and a resume under other settings is refused. A loss that is not finite
    stops the job (`NonFiniteError`) before anything is saved from it.
    Returns the prepared model and the logged history (loss records and eval records)."""
    accum = train.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accum  # an epoch's incomplete last window is dropped
    if steps_per_epoch == 0:
        raise ConfigError(f"{desc}: {len(loader)} batches per epoch cannot fill one "
                          f"accumulation window of {accum}; lower gradient_accumulation_steps")
    total_steps = total_optimizer_steps(train, steps_per_epoch)
    optimizer = make_optimizer(model, train)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(train.warmup_ratio * total_steps), total_steps)
    sampler = loader.batch_sampler
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    run = _Run(accelerator, train, desc, total_steps, scheduler, checkpoints, evaluator, section,
               identity)
    _print_plan(accelerator, train, desc, total_steps, steps_per_epoch)
    progress = run.progress
    model.train()
    with run.stop.listening():
        while progress.step < total_steps:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(progress.epoch)
            batches = iter(accelerator.skip_first_batches(loader, progress.batches_in_epoch)
                           if progress.batches_in_epoch else loader)
            while progress.step < total_steps:
                with run.timer.phase("data"):  # collating reads the cached teacher logits
                    window = list(islice(batches, accum))
                if len(window) < accum:
                    break
                if hasattr(loss_fn, "set_step"):  # losses on a schedule (temperature, alpha)
                    loss_fn.set_step(progress.step, total_steps)
                sums = optimizer_step(model, window, loss_fn, optimizer, scheduler, accelerator,
                                      train, run.timer)
                run.after_step(model, sums)
            if progress.step < total_steps:  # the epoch ran out: start the next one
                progress.epoch += 1
                progress.batches_in_epoch = 0
    run.bar.close()
    return model, run.history


class _Run:
    """What one `train_loop` carries from step to step, and what follows each optimizer step:
    logging, evaluation, checkpointing and a stop that every process agrees on."""

    def __init__(self, accelerator: Accelerator, train: TrainConfig, desc: str,
                 total_steps: int, scheduler, checkpoints: Path | None,
                 evaluator: PeriodicEval | None, section: str, identity: dict | None):
        self.accelerator, self.train, self.desc, self.section = accelerator, train, desc, section
        self.identity = identity
        self.total_steps, self.scheduler = total_steps, scheduler
        self.checkpoints, self.evaluator = checkpoints, evaluator
        self.progress, self.history = Progress(), []
        if checkpoints is not None and complete_checkpoints(checkpoints):
            newest = complete_checkpoints(checkpoints)[-1]
            check_same_run(newest, identity)
            self.progress, self.history = load_checkpoint(accelerator, newest)
            accelerator.print(f"{desc}: resuming from {newest} (step {self.progress.step})")
        self.bar = tqdm(total=total_steps, initial=self.progress.step, desc=desc,
                        disable=not accelerator.is_local_main_process)
        self.log_window, self.start = [], time.perf_counter()
        self.timer = StepTimer(enabled=train.time_breakdown)
        self.stop = StopRequest()
        self.first_step = self.progress.step + 1

    def after_step(self, model: torch.nn.Module, sums: dict[str, torch.Tensor]) -> None:
        progress = self.progress
        check_step_finite(self.accelerator, sums, step=progress.step + 1,
                          first_step=self.first_step, section=self.section,
                          learning_rate=self.train.learning_rate, desc=self.desc)
        self.log_window.append(sums)
        self.timer.end_step()
        progress.step += 1
        progress.batches_in_epoch += self.train.gradient_accumulation_steps
        self.bar.update(1)
        last = progress.step == self.total_steps
        logged = progress.step % self.train.log_every == 0 or last
        if logged:
            self._log()
        if self.evaluator is not None and self.evaluator.due(progress.step, last):
            self.history.append(self.evaluator.run(model, progress, self.history))
        every, saved = self.train.checkpoint_every, None
        if self.checkpoints is not None and every and (progress.step % every == 0 or last):
            saved = self._save_checkpoint(model)
        elif last:
            self._check_weights(model, "the trained model")
        if logged and not last and self.stop.agreed(self.accelerator):
            self._stop_here(model, saved)

    def _log(self) -> None:
        record = _log_record(self.log_window, self.accelerator, self.progress, self.start,
                             self.scheduler, self.timer)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.history.append(record)
        self.accelerator.log(flat_metrics(record), step=self.progress.step)
        self.log_window = []

    def _save_checkpoint(self, model: torch.nn.Module) -> Path:
        self._check_weights(model, f"the checkpoint of step {self.progress.step}")
        return save_checkpoint(self.accelerator, self.checkpoints, self.progress, self.history,
                               self.train.keep_checkpoints, self.train.batch_size, self.identity)

    def _check_weights(self, model: torch.nn.Module, what: str) -> None:
        """An update can overflow the weights while the loss that drove it was still finite
        (how soon depends on the CPU's arithmetic): the same hint as a non-finite loss."""
        hint = divergence_hint(self.section, self.train.learning_rate)
        check_weights_finite(self.accelerator, model, what, cause=(
            f"{self.desc}: the weights are not finite at step {self.progress.step} (its loss "
            f"was still finite); {hint}"))

    def _stop_here(self, model: torch.nn.Module, saved: Path | None) -> None:
        """Save where the job stands (unless this step was just saved) and leave: a rerun
        of the same command resumes here."""
        if saved is None and self.checkpoints is not None:
            saved = self._save_checkpoint(model)
        raise JobStopped(self.desc, self.progress.step, saved)


def _print_plan(accelerator: Accelerator, train: TrainConfig, desc: str, total_steps: int,
                steps_per_epoch: int) -> None:
    processes = accelerator.num_processes
    effective = train.batch_size * processes * train.gradient_accumulation_steps
    accelerator.print(f"{desc}: {total_steps} optimizer steps ({steps_per_epoch} per epoch), "
                      f"{processes} process(es) ({accelerator.distributed_type.value}), "
                      f"{train.batch_size} rows per process x {train.gradient_accumulation_steps}"
                      f" accumulation = effective batch {effective}")


def optimizer_step(model, window: list[dict], loss_fn: LossFn, optimizer, scheduler,
                   accelerator: Accelerator, train: TrainConfig,
                   timer: StepTimer) -> dict[str, torch.Tensor]:
    """One optimizer step over a window of micro-batches; returns this process's sums and
    the step's global row count. (Under DeepSpeed the engine steps its optimizer inside
    `backward`, so the timer counts that step as backward.)"""
    rows = reduce_sum(accelerator, torch.stack([valid_rows(b) for b in window]).sum())
    # Accelerate (or DeepSpeed) divides by the accumulation steps and the all-reduce averages
    # over processes: undo both, so the gradient is that of sum(loss) / rows.
    scale = len(window) * accelerator.num_processes / rows.clamp(min=1).float()
    sums: dict[str, torch.Tensor] = {}
    for batch in window:
        with accelerator.accumulate(model):
            parts = loss_fn(model, batch, timer)
            with timer.phase("backward"):
                accelerator.backward(parts["loss"] * scale)
            with timer.phase("optimizer"):
                if accelerator.sync_gradients and train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
    return {**sums, "rows": rows.float()}


def _log_record(window: list[dict], accelerator: Accelerator, progress: Progress,
                start: float, scheduler, timer: StepTimer) -> dict:
    """Means per valid row of each loss part over the logged steps (one sync per line), and
    this process's step-time breakdown over them."""
    rows = torch.stack([w["rows"] for w in window]).sum()
    names = [k for k in window[0] if k != "rows"]
    sums = reduce_sum(accelerator, torch.stack([sum(w[k] for w in window) for k in names]))
    means = (sums / rows.clamp(min=1)).tolist()
    record = {"step": progress.step, "epoch": progress.epoch,
              "seconds": round(time.perf_counter() - start, 2),
              "lr": scheduler.get_last_lr()[0], **dict(zip(names, means, strict=True))}
    step_ms, timed_steps = timer.take()
    if timed_steps:
        record.update(step_ms=step_ms, timed_steps=timed_steps)
    return record


def save_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory: Path,
               history: list[dict], submodule: str | None = None) -> None:
    """Weights (safetensors, ZeRO-3 shards gathered), config, tokenizer and the training log:
    a directory that `transformers` alone loads. `submodule` saves only that part of the
    trained module (the student inside StudentWithProjections)."""
    accelerator.wait_for_everyone()
    check_weights_finite(accelerator, model, str(directory))
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3
    failure = None
    if accelerator.is_main_process:
        try:
            _write_model(accelerator, model, tokenizer, Path(directory), history, state_dict,
                         submodule)
        except (OSError, SafetensorError) as err:
            failure = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
    # Every process learns of a failed write, rather than waiting for the main one.
    failed = reduce_sum(accelerator, torch.tensor(float(failure is not None),
                                                  device=accelerator.device)).item()
    if failed:
        raise OutputError(f"could not write {directory}: {failure or 'on the main process'} "
                          f"(is the disk full or the folder read-only?); the previous one, if "
                          f"any, is kept")
    accelerator.wait_for_everyone()


def _write_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, directory: Path,
                 history: list[dict], state_dict: dict, submodule: str | None) -> None:
    target = accelerator.unwrap_model(model)
    if submodule:
        target = getattr(target, submodule)
        prefix = submodule + "."
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def build(folder: Path) -> None:
        target.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        (folder / "training_log.json").write_text(json.dumps(history, indent=1))

    replace_directory(directory, build)  # the previous model stays whole until then

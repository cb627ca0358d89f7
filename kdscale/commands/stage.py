"""What the two training commands share around their own recipe: `kdscale finetune` and
`kdscale distill` each begin with the checks that need no model and end by saving what
they trained. The recipe in between is theirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from kdscale.config import Config, TrainConfig, to_dict
from kdscale.data import check_sources
from kdscale.distributed import check_launch_deepspeed_config, process_state, uses_deepspeed
from kdscale.files import check_writable
from kdscale.tasks import Task, get_task
from kdscale.train.accelerator import make_accelerator
from kdscale.train.checkpoint import check_resume, checkpoint_root
from kdscale.train.loop import LossFn, save_model, train_loop
from kdscale.train.periodic_eval import PeriodicEval
from kdscale.train.timing import print_breakdown
from kdscale.train.tracking import log_dir, start_tracking


@dataclass
class Stage:
    name: str  # "finetune" | "distill": the config section, run name and checkpoint folder
    config: Config
    task: Task
    state: PartialState

    @property
    def settings(self) -> TrainConfig:
        return getattr(self.config, self.name)

    @property
    def checkpoints(self) -> Path:
        return checkpoint_root(self.config.output_dir, self.name)


def begin_stage(config: Config, name: str) -> Stage:
    """The checks that need no model (data files, the launch's DeepSpeed JSON, a resume
    under other launch settings), then this process's place in the launch."""
    task = get_task(config.task)
    check_sources(task.data_config(config))
    check_writable(config.output_dir, "output_dir")
    if name == "finetune":
        check_writable(config.teacher_dir.parent, "teacher.checkpoint")
    check_launch_deepspeed_config()
    state = process_state()
    stage = Stage(name, config, task, state)
    check_resume(stage.checkpoints, stage.settings, name, state.num_processes, uses_deepspeed())
    return stage


def start_accelerator(stage: Stage) -> Accelerator:
    """Built after the models: under a ZeRO-3 config, transformers would otherwise load them
    already partitioned (a teacher's layers could then not be copied into a student)."""
    accelerator = make_accelerator(stage.settings, stage.config.seed, stage.name,
                                   log_dir(stage.config.output_dir))
    start_tracking(accelerator, stage.name, to_dict(stage.config))
    return accelerator


# What makes a run what it is, beyond the data: a checkpoint resumes only the same run.
# (Batch sizes and accumulation are checked against the launch by `check_resume`; logging,
# checkpointing and evaluation intervals may change between a run and its resume.)
IDENTITY_SECTIONS = {"finetune": ("teacher",), "distill": ("student", "loss", "teacher")}
NOT_IDENTITY = {"teacher.checkpoint", "teacher.placement", "teacher.deepspeed_config"}
OPTIMIZATION_KEYS = ("epochs", "max_steps", "learning_rate", "weight_decay", "warmup_ratio",
                     "max_grad_norm", "mixed_precision")


def run_identity(stage: Stage, data_fingerprint: str) -> dict:
    """The settings recorded in every checkpoint and compared on resume, as flat keys."""
    raw = to_dict(stage.config)
    identity = {"task": raw["task"], "seed": raw["seed"], "data": data_fingerprint}
    for section in IDENTITY_SECTIONS[stage.name]:
        identity |= {f"{section}.{key}": value for key, value in raw[section].items()
                     if f"{section}.{key}" not in NOT_IDENTITY}
    identity |= {f"{stage.name}.{key}": raw[stage.name][key] for key in OPTIMIZATION_KEYS}
    return identity


def train_and_save(stage: Stage, accelerator: Accelerator, model: torch.nn.Module, loader,
                   loss_fn: LossFn, *, what: str, tokenizer, save_to: Path, data_fingerprint: str,
                   evaluator: PeriodicEval | None = None, submodule: str | None = None) -> None:
    """Train (resuming from the newest checkpoint of the same run), save `what` to
    `save_to`, print where the step time went."""
    model, history = train_loop(model, loader, loss_fn, stage.settings, accelerator,
                                desc=f"{stage.name} {what}", checkpoints=stage.checkpoints,
                                evaluator=evaluator, section=stage.name,
                                identity=run_identity(stage, data_fingerprint))
    save_model(accelerator, model, tokenizer, save_to, history, submodule=submodule)
    accelerator.print(f"{what} saved to {save_to}")
    print_breakdown(accelerator, history)
    accelerator.end_training()

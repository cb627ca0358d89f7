"""`kdscale env`: what a launch will do, printed before it starts.

The launch's shape comes from an accelerate config file (with the launcher's
`--num_machines/--num_processes` on top, as `accelerate launch` applies them) or, when run
under a launcher, from the environment it set. The models are counted on the meta device
and nothing is loaded, so this runs in seconds on a login node.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from kdscale.config import Config, ConfigError, TrainConfig
from kdscale.plan.estimates import (
    cache_estimate,
    memory_estimate,
    memory_inputs,
    teacher_estimate,
)
from kdscale.plan.runtime import runtime_term
from kdscale.plan.sizes import ModelSizes, model_sizes
from kdscale.plan.zero import zero_settings


@dataclass
class Launch:
    origin: str  # the accelerate config file, or "environment"
    nodes: int
    world_size: int
    deepspeed_file: str | None  # the student's DeepSpeed JSON; None: no DeepSpeed
    mixed_precision: str  # no | bf16 | fp16

    @property
    def per_node(self) -> int:
        return self.world_size // self.nodes


def launch_from_file(path: str | Path, num_machines: int | None = None,
                     num_processes: int | None = None) -> Launch:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"accelerate config {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"accelerate config {path}: expected a mapping of settings")
    deepspeed = None
    if raw.get("distributed_type") == "DEEPSPEED":
        deepspeed = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if not deepspeed:
            raise ConfigError(f"accelerate config {path}: deepspeed_config."
                              f"deepspeed_config_file is not set (kdscale keeps DeepSpeed "
                              f"settings in configs/deepspeed/*.json)")
    launch = Launch(str(path), int(num_machines or raw.get("num_machines", 1)),
                    int(num_processes or raw.get("num_processes", 1)), deepspeed,
                    str(raw.get("mixed_precision", "no")))
    return _checked(launch)


def launch_from_environment(num_machines: int | None = None,
                            num_processes: int | None = None) -> Launch:
    """The launch this process is part of (`accelerate launch ... -m kdscale env`), or, with
    `--num_processes` (and `--num_machines`) and no accelerate config, a plain multi-process
    launch of that shape (`accelerate launch --multi_gpu --num_processes N`)."""
    if num_processes:
        nodes = num_machines or 1
        return _checked(Launch("--num_processes", nodes, num_processes, None,
                               os.environ.get("ACCELERATE_MIXED_PRECISION", "no")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    deepspeed = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return _checked(Launch("environment", max(world // per_node, 1), world, deepspeed,
                           os.environ.get("ACCELERATE_MIXED_PRECISION", "no")))


def _checked(launch: Launch) -> Launch:
    if launch.nodes < 1 or launch.world_size < launch.nodes:
        raise ConfigError(f"{launch.origin}: {launch.world_size} process(es) cannot span "
                          f"{launch.nodes} machine(s)")
    if launch.world_size % launch.nodes:
        raise ConfigError(f"{launch.origin}: num_processes {launch.world_size} is the total "
                          f"over machines and must divide evenly by num_machines "
                          f"{launch.nodes}")
    if launch.deepspeed_file and not Path(launch.deepspeed_file).is_file():
        raise ConfigError(f"{launch.origin}: deepspeed_config_file {launch.deepspeed_file} "
                          f"does not exist (paths are relative to where you launch)")
    return launch


@dataclass
class Plan:
    launch: Launch
    sizes: ModelSizes
    batches: dict  # per stage: per device, accumulation, effective
    student_zero: dict  # the student's ZeRO settings (kdscale.plan.zero.ZeroSettings)
    teacher: dict  # placement, why, DeepSpeed stage, weight bytes
    cache: dict  # location, whether written, bytes (measured or estimated)
    memory: dict  # per process and stage: named terms, bytes, and each stage's peak
    memory_inputs: dict  # the numbers the memory model read (kdscale.plan.stages)

    def to_dict(self) -> dict:
        return asdict(self)


def training_precision(train: TrainConfig, launch: Launch) -> str:
    return launch.mixed_precision if train.mixed_precision == "launch" else train.mixed_precision


def batch_plan(train: TrainConfig, launch: Launch) -> dict:
    accumulation = train.gradient_accumulation_steps
    return {"per_device": train.batch_size, "accumulation": accumulation,
            "effective": train.batch_size * accumulation * launch.world_size}


def make_plan(config: Config, launch: Launch, device_memory: float | None,
              device: str = "cpu", runtime_gib: float | None = None,
              measured_runtime: float | None = None) -> Plan:
    """`device`: whose memory each process uses, a GPU's or (cpu) the host's;
    `measured_runtime`: a process's bytes before any model, measured on this CPU."""
    precisions = {"finetune": training_precision(config.finetune, launch),
                  "distill": training_precision(config.distill, launch)}
    launch = replace(launch, mixed_precision=precisions["distill"])
    sizes = model_sizes(config)
    zeros = {"finetune": zero_settings(launch.deepspeed_file, sizes.teacher_hidden),
             "distill": zero_settings(launch.deepspeed_file, sizes.student_hidden)}
    teacher = teacher_estimate(config, launch, sizes, device_memory)
    batches = {"finetune": batch_plan(config.finetune, launch),
               "distill": batch_plan(config.distill, launch)}
    inputs = memory_inputs(config, launch, sizes, zeros, teacher, precisions, device)
    memory = memory_estimate(inputs, runtime_term(device, runtime_gib, measured_runtime))
    return Plan(launch, sizes, batches, asdict(zeros["distill"]), teacher,
                cache_estimate(config, sizes), memory, inputs.to_dict())

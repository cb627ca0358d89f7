"""`kdscale env`: what a launch will do, printed before it starts.

The launch's shape comes from an accelerate config file (with the launcher's
`--num_machines/--num_processes` on top, as `accelerate launch` applies them) or, when run
under a launcher, from the environment it set. The models are counted on the meta device
and nothing is loaded, so this runs in seconds on a login node.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from kdscale.config import Config, ConfigError, TrainConfig
from kdscale.plan.estimates import cache_estimate, memory_estimate, teacher_estimate
from kdscale.plan.sizes import ModelSizes, model_sizes


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


def zero_settings(deepspeed_file: str | None) -> dict:
    """The student's ZeRO stage and offloading, from its DeepSpeed JSON."""
    if deepspeed_file is None:
        return {"stage": 0, "offload_optimizer": False, "offload_params": False}
    zero = json.loads(Path(deepspeed_file).read_text()).get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    return {"stage": int(zero.get("stage", 0)), "offload_optimizer":
            offloaded("offload_optimizer"), "offload_params": offloaded("offload_param")}


@dataclass
class Plan:
    launch: Launch
    sizes: ModelSizes
    batches: dict  # per stage: per device, accumulation, effective
    student_zero: dict
    teacher: dict  # placement, why, DeepSpeed stage, weight bytes per device
    cache: dict  # location, whether written, bytes (measured or estimated)
    memory: dict  # per device: student parts and teacher weights, bytes

    def to_dict(self) -> dict:
        return asdict(self)


def training_precision(train: TrainConfig, launch: Launch) -> str:
    return launch.mixed_precision if train.mixed_precision == "launch" else train.mixed_precision


def batch_plan(train: TrainConfig, launch: Launch) -> dict:
    accumulation = train.gradient_accumulation_steps
    return {"per_device": train.batch_size, "accumulation": accumulation,
            "effective": train.batch_size * accumulation * launch.world_size}


def make_plan(config: Config, launch: Launch, device_memory: float | None) -> Plan:
    launch = replace(launch, mixed_precision=training_precision(config.distill, launch))
    sizes = model_sizes(config)
    zero = zero_settings(launch.deepspeed_file)
    teacher = teacher_estimate(config, launch, sizes, device_memory)
    batches = {"finetune": batch_plan(config.finetune, launch),
               "distill": batch_plan(config.distill, launch)}
    return Plan(launch, sizes, batches, zero, teacher, cache_estimate(config, sizes),
                memory_estimate(config, launch, sizes, zero, teacher))


def _gib(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GiB"
    return f"{value / 1024**2:.1f} MiB"


# What the memory of distill holds, by where it reads teacher output from (teacher_source).
DISTILL_TOTAL = {"cache": " (student; the teacher is read from the cache)",
                 "online": " (student + online teacher)", "none": " (student; hard labels)"}


def describe_plan(plan: Plan) -> str:
    launch, sizes, teacher = plan.launch, plan.sizes, plan.teacher
    zero = plan.student_zero
    lines = [
        f"launch        {launch.origin}",
        f"world size    {launch.world_size} process(es) = {launch.nodes} node(s) x "
        f"{launch.per_node} per node; distill precision {launch.mixed_precision}",
    ]
    for stage, batch in plan.batches.items():
        lines.append(f"{stage:<14}{batch['per_device']} rows per device x "
                     f"{batch['accumulation']} accumulation x {launch.world_size} = "
                     f"effective batch {batch['effective']}")
    offload = " + optimizer offload" if zero["offload_optimizer"] else ""
    stage = f"DeepSpeed ZeRO-{zero['stage']}{offload} ({launch.deepspeed_file})" \
        if launch.deepspeed_file else "no DeepSpeed (DDP)"
    lines += [
        f"student       {sizes.student_layers} layers, {sizes.student_params / 1e6:.1f}M "
        f"parameters; {stage}",
        f"teacher       {sizes.teacher_layers} layers, {sizes.teacher_params / 1e6:.1f}M "
        f"parameters ({sizes.teacher_from}), {teacher['dtype']}; runs in: {teacher['runs_in']}",
        f"  placement   {teacher['placement']}: {teacher['why']}",
        f"  DeepSpeed   {teacher['deepspeed']}",
        _cache_line(plan.cache),
        "memory per device (estimates; the runtime and buffers come on top):",
    ]
    for part, value in plan.memory["student"].items():
        lines.append(f"  student {part:<12}{_gib(value)}")
    per_device = teacher["weights_per_device"]
    lines.append(f"  teacher weights     {_gib(per_device['replicate'])} replicated, "
                 f"{_gib(per_device['zero3'])} as a 1/{launch.world_size} ZeRO-3 shard")
    lines.append(f"  distill total       {_gib(plan.memory['distill_total'])}"
                 + DISTILL_TOTAL[teacher["source"]])
    return "\n".join(lines)


def _cache_line(cache: dict) -> str:
    if not cache["read"]:
        return f"cache         {cache['dir']}: {cache['why']}"
    if cache["written"]:
        return (f"cache         {cache['dir']}: written, {cache['examples']:,} examples, "
                f"{cache['kind']} {cache['dtype']}, {_gib(cache['bytes'])} on disk")
    rows = f"{cache['examples']:,} examples" if cache["examples"] else "rows unknown"
    size = f"~{_gib(cache['bytes'])}" if cache["bytes"] else "size unknown"
    return (f"cache         {cache['dir']}: not written yet; {rows} x "
            f"{cache['bytes_per_row']} B ({cache['kind']} {cache['dtype']}) = {size}")





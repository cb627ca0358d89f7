"""`kdscale env`: what a launch will do (processes, batches, ZeRO stages, memory), printed
before any work."""

from __future__ import annotations

import json
import os

from kdscale.config import Config
from kdscale.plan.describe import describe_plan
from kdscale.plan.launch import launch_from_environment, launch_from_file, make_plan


def run_env(args, config: Config) -> None:
    """Print the plan once, from the main process when run under a launcher."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    launch = launch_from_file(args.accelerate_config, args.num_machines, args.num_processes) \
        if args.accelerate_config else launch_from_environment(args.num_machines,
                                                               args.num_processes)
    memory = args.device_memory_gib
    if memory is None:
        memory = _local_device_memory_gib()
    device = args.device or _local_device()
    measured = measured_runtime_bytes() if device == "cpu" and args.runtime_gib is None \
        else None
    plan = make_plan(config, launch, memory, device, args.runtime_gib, measured)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else describe_plan(plan))


def measured_runtime_bytes() -> int:
    """Resident memory of this process once it has imported what every kdscale job
    imports: the runtime each launched process holds before it loads a model."""
    import psutil

    import kdscale.commands.cache  # noqa: F401 - imported for the memory they take
    import kdscale.commands.distill  # noqa: F401
    import kdscale.commands.finetune  # noqa: F401

    return psutil.Process().memory_info().rss


def _local_device() -> str:
    """Plan for this machine's own devices: its GPUs if it has them, else its CPUs."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _local_device_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1024**3
    return None

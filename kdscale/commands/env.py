"""`kdscale env`: what a launch will do (processes, batches, ZeRO stages, memory), printed
before any work."""

from __future__ import annotations

import json
import os

from kdscale.config import Config
from kdscale.plan.launch import describe_plan, launch_from_environment, launch_from_file, make_plan


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
    plan = make_plan(config, launch, memory)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else describe_plan(plan))


def _local_device_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1024**3
    return None

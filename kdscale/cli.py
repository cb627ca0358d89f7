"""`kdscale <command> [--config FILE] [--section.key value ...]`; the same under
`accelerate launch -m kdscale <command> ...`."""

from __future__ import annotations

import argparse
import os
import sys

from kdscale.config import load_config
from kdscale.errors import KdscaleError
from kdscale.train.stopping import EXIT_STOPPED, JobStopped

COMMANDS = {
    "finetune": "fine-tune the teacher on the task (cross-entropy)",
    "cache": "run the teacher once over the training data and store its logits",
    "distill": "train a student of the teacher's layers from the logit cache",
    "eval": "evaluate teacher and student; write report.json, report.md, report.png",
    "demo": "the whole pipeline offline on a built-in task (finetune, cache, distill, eval)",
    "env": "print what a launch will do (processes, batches, ZeRO stages, memory) and exit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdscale", description="Distill BERT-family teachers into small students.",
        epilog="Any config key can be overridden with --section.key value, "
               "e.g. --loss.temperature 4 --student.layers [0,2,4].")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name != "demo":
            sub.add_argument("--config", required=True, help="experiment YAML (see configs/)")
        else:
            sub.add_argument("--output_dir", default="runs/demo", help="where the demo writes")
            sub.add_argument("--cache_processes", type=int, default=2, metavar="N",
                             help="processes the cache stage launches, its teacher sharded by "
                                  "ZeRO-3 over them (default 2; 1 caches in this process)")
        if name == "env":
            _add_env_arguments(sub)
    return parser


def _add_env_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--accelerate_config", help="the accelerate config of the launch; "
                     "default: the launch this runs under (or one process)")
    sub.add_argument("--num_machines", type=int, help="as given to accelerate launch")
    sub.add_argument("--num_processes", type=int, help="total over machines, as given to "
                     "accelerate launch")
    sub.add_argument("--device_memory_gib", type=float,
                     help="memory per device, to resolve teacher.placement auto")
    sub.add_argument("--device", choices=["cpu", "gpu"], help="whose memory each process "
                     "uses; default: this machine's GPUs if it has them, else its CPUs (plan "
                     "a GPU launch from a login node with --device gpu)")
    sub.add_argument("--runtime_gib", type=float, help="memory each process holds before "
                     "any model (default: measured here on a CPU, 0.5 GiB of CUDA context on "
                     "a GPU)")
    sub.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(command: str, config) -> None:
    # Imported per command: `kdscale --help` should not wait for torch and transformers.
    from kdscale.distributed import warn_if_processes_lost

    warn_if_processes_lost()
    if command == "finetune":
        from kdscale.commands.finetune import run_finetune as run_command
    elif command == "cache":
        from kdscale.commands.cache import run_cache as run_command
    elif command == "distill":
        from kdscale.commands.distill import run_distill as run_command
    elif command == "eval":
        from kdscale.commands.evaluate import run_eval as run_command
    run_command(config)
    _leave_process_group()


def _leave_process_group() -> None:
    from kdscale.distributed import leave_process_group  # imported late, as in run()

    leave_process_group()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, overrides = build_parser().parse_known_args(argv)
    try:
        if args.command == "env":
            from kdscale.commands.env import run_env

            run_env(args, load_config(args.config, overrides))
        elif args.command == "demo":
            from kdscale.commands.demo import run_demo

            run_demo(args.output_dir, overrides, args.cache_processes)
            _leave_process_group()
        else:
            run(args.command, load_config(args.config, overrides))
    except JobStopped as stopped:  # every process stops at the same step
        print(f"kdscale {args.command}: {stopped}", file=sys.stderr)
        _leave_process_group()
        return EXIT_STOPPED
    except (KdscaleError, FileNotFoundError) as err:
        print(f"kdscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a hung or dead peer: say so instead of a gloo/NCCL trace
        from kdscale.distributed import timed_out, timeout_message

        if not timed_out(err):
            raise
        print(f"kdscale {args.command}: error: {timeout_message(err)}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    """`kdscale` and `python -m kdscale`: `main`, then the process ends with its code."""
    code = main()
    # Every command that joins a launch has imported kdscale.distributed; `env` may not
    # have, and ends without waiting for torch to import.
    distributed = sys.modules.get("kdscale.distributed")
    if distributed is not None:
        distributed.end_process(code)
    sys.exit(code)

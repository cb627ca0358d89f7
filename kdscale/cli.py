"""`kdscale <command> [--config FILE] [--section.key value ...]`; the same under
`accelerate launch -m kdscale <command> ...`."""

from __future__ import annotations

import argparse
import os
import sys

from kdscale.config import load_config
from kdscale.errors import KdscaleError

COMMANDS = {
    "finetune": "fine-tune the teacher on the task (cross-entropy)",
    "cache": "run the teacher once over the training data and store its logits",
    "distill": "train a student of the teacher's layers from the logit cache",
    "eval": "evaluate teacher and student; write report.json, report.md, report.png",
    "demo": "the whole pipeline offline on a built-in task (finetune, cache, distill, eval)",
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
    return parser


def run(command: str, config) -> None:
    # Imported per command: `kdscale --help` should not wait for torch and transformers.
    if command == "finetune":
        from kdscale.finetune import run_finetune as run_command
    elif command == "cache":
        from kdscale.caching import run_cache as run_command
    elif command == "distill":
        from kdscale.distill import run_distill as run_command
    elif command == "eval":
        from kdscale.evaluation import run_eval as run_command
    run_command(config)
    _leave_process_group()


def _leave_process_group() -> None:
    """Every process leaves together: a rank exiting while another still talks to it over
    gloo can abort the other."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, overrides = build_parser().parse_known_args(argv)
    try:
        if args.command == "demo":
            from kdscale.demo import run_demo

            run_demo(args.output_dir, overrides)
            _leave_process_group()
        else:
            run(args.command, load_config(args.config, overrides))
    except (KdscaleError, FileNotFoundError) as err:
        print(f"kdscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0

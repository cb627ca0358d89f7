"""How this process joins the launch: the process group, the Accelerator, DeepSpeed or not.

Machines without CUDA have no NCCL, and Accelerate needs to be told what to use instead:
- plain multi-process runs: `cpu=True` and gloo (without `cpu=True` several launched
  processes each train alone: distributed type NO, no gradient all-reduce);
- DeepSpeed runs (`accelerate launch --config_file configs/accelerate/cpu_zero2.yaml`): gloo
  but NOT `cpu=True`, which would make Accelerate skip DeepSpeed's own initialization.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import NoReturn

import torch
from accelerate import Accelerator, PartialState

from kdscale.errors import KdscaleError

logger = logging.getLogger("kdscale")
# What a launcher that starts N processes tells each of them (torchrun, MPI implementations).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_distributed() -> bool:
    """Started by a launcher with more than one process (`accelerate launch`, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def processes_lost() -> str | None:
    """A warning for a launch that asked for several processes and started one, else None.

    `accelerate launch --num_processes N` without `--multi_gpu`, on a machine without several
    GPUs (where accelerate does not add it), runs the script once, alone, without a word. Its
    simple launcher still exports MASTER_ADDR, which it sets only for N > 1 or several
    machines, and no process count: that pair is the sign."""
    under_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by every launcher
    if not under_accelerate or "MASTER_ADDR" not in os.environ:
        return None
    if any(name in os.environ for name in WORLD_SIZE_VARIABLES):
        return None
    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    fix = "replace --cpu with --multi_gpu" if cpu else "add --multi_gpu"
    return (f"accelerate launch was asked for several processes (--num_processes or "
            f"--num_machines above 1) but started this one alone, as it does without "
            f"--multi_gpu on a machine without several GPUs: {fix} to train with all of them")


def warn_if_processes_lost() -> None:
    """Logs `processes_lost()`'s warning, where there is one."""
    message = processes_lost()
    if message:
        logger.warning(message)


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def processes_on_this_machine(num_processes: int) -> int:
    """This machine's share of the job's processes: they share its memory."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    return local or num_processes


def check_launch_deepspeed_config() -> None:
    """The DeepSpeed JSON an accelerate config points at, checked before any work."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if uses_deepspeed() and path != "none":
        from kdscale.config.deepspeed import check_deepspeed_config

        check_deepspeed_config(path, f"deepspeed_config_file {path}")


TIMEOUT_VARIABLE = "KDSCALE_COLLECTIVE_TIMEOUT"
# Seconds a collective waits for the other processes before this one fails. Long enough for
# the slowest legitimate wait (rank 0 writing a large checkpoint or a shard while the others
# sit in a barrier), short enough that a hung or stopped rank fails the job within the hour.
DEFAULT_TIMEOUT_S = 1800


def collective_timeout() -> timedelta:
    """`KDSCALE_COLLECTIVE_TIMEOUT` (seconds) or the default; read by every process."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise KdscaleError(f"{TIMEOUT_VARIABLE}: expected a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


def timed_out(err: BaseException) -> bool:
    """A collective gave up waiting for another process (gloo and NCCL word it differently)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def timeout_message(err: BaseException) -> str:
    seconds = collective_timeout().total_seconds()
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return (f"a collective operation waited more than {seconds:g} s ({TIMEOUT_VARIABLE}) for "
            f"another process, which is hung or dead; see its log. Finished work is kept: "
            f"rerun the same command to resume ({first_line})")


def process_state() -> PartialState:
    """This process's place in the launch; the process group is created on first call,
    with the collective timeout (a hung rank then fails the job instead of stalling it)."""
    timeout = collective_timeout()
    if torch.cuda.is_available():
        return PartialState(timeout=timeout)
    if uses_deepspeed():
        return PartialState(backend="gloo", timeout=timeout)
    if launched_distributed():
        return PartialState(cpu=True, backend="gloo", timeout=timeout)
    return PartialState(cpu=True)


def leave_process_group() -> None:
    """Every process leaves together: a rank whose interpreter exits while the group is still
    up can abort in gloo's teardown ("terminate called without an active exception", SIGABRT)
    after its work is done, and the launch then fails."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> NoReturn:
    """Ends a launched process whose work is done: its exit handlers run (logs and trackers
    flush), the interpreter's teardown does not. A group's gloo threads stop only when the
    last reference to it goes, and DeepSpeed's engines and ZeRO-3 parameters keep theirs
    after the group is left; torn down in the middle of the interpreter's own teardown, a
    group can abort its process (SIGABRT) after the work is done, failing the launch."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_process(code: int = 0) -> NoReturn:
    """The last line of a script (kdscale's commands, a Trainer script) whose work is done: a
    launched process leaves the group with the others and ends without the interpreter's
    teardown (`exit_without_teardown`); a process run alone exits as usual."""
    if launched_distributed():
        leave_process_group()
        exit_without_teardown(code)
    sys.exit(code)


def leave_process_group_at_exit() -> None:
    """For scripts that kdscale does not end, a user's Trainer script: leave the group
    together when the interpreter exits. Registered once however often it is called."""
    atexit.unregister(_leave_unless_failed)
    atexit.register(_leave_unless_failed)


def _leave_unless_failed() -> None:
    # After an uncaught exception (Python sets sys.last_type before the exit handlers run)
    # the launcher stops the other processes; a barrier would only wait for them.
    if not hasattr(sys, "last_type"):
        leave_process_group()


def reduce_sum(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(value, reduction="sum") if accelerator.num_processes > 1 else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_BLOCK = 1 << 20  # bytes: blocks from this size up are mapped alone


def return_large_blocks_when_freed() -> bool:
    """On a CPU, ZeRO-3 gathers each layer into new buffers and frees them after use. glibc
    raises its mmap threshold as large blocks are freed and keeps the later ones in its
    heaps, which it rarely gives back: a BERT-large ZeRO-3 teacher on 2 processes grew from
    1.1 to 3.9 GiB per process in three forwards. A fixed threshold maps each block of 1 MiB
    or more on its own and unmaps it when freed. Returns whether it was set (glibc only;
    GPU memory is PyTorch's own allocator's, so CUDA machines keep glibc's default)."""
    if torch.cuda.is_available():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to set
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))

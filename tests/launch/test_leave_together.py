"""Leaving the process group together. A script that kdscale does not end (a user's Trainer
script): `DistillationTrainer` registers `leave_process_group_at_exit`, whose exit handler
destroys the group in every process of a clean run and stands aside after an uncaught
exception, when the launcher stops the others and a barrier would only wait for them.
kdscale's own commands leave the group, run the exit handlers and end without the
interpreter's teardown, in which DeepSpeed's groups (still referenced) would be torn down."""

from __future__ import annotations

import subprocess
import sys

from kdscale.distributed import free_port
from tests.support.exit_probe import EXIT_HANDLERS_ONLY, exit_marks, probe_env
from tests.support.pipeline import (
    LAUNCH_ENV,
    REPO,
    accelerate_launch,
    launch_command,
    write_config,
)

# Its own exit handler is registered first, so it runs last: after kdscale's.
SCRIPT = """
import atexit
import sys
import torch.distributed as dist
from kdscale.distributed import leave_process_group_at_exit

dist.init_process_group("gloo")  # from the launcher's environment
rank = dist.get_rank()
atexit.register(lambda: sys.stdout.write(
    f"rank {rank}: group {'up' if dist.is_initialized() else 'left'} at exit\\n"))
leave_process_group_at_exit()
leave_process_group_at_exit()  # a second Trainer in the same script
if sys.argv[1:] == ["fail"]:
    raise RuntimeError("a failure after the group is up")
"""


def write_script(tmp_path):
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    return script


def test_every_process_of_a_clean_run_leaves_the_group_before_exit(tmp_path):
    result = subprocess.run(launch_command(write_script(tmp_path)), cwd=REPO, env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(result.stdout.splitlines()) == ["rank 0: group left at exit",
                                                  "rank 1: group left at exit"]


def test_a_failed_run_exits_without_waiting_for_the_others(tmp_path):
    env = {**LAUNCH_ENV, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(write_script(tmp_path)), "fail"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "RuntimeError: a failure after the group is up" in result.stderr
    assert result.stdout.splitlines() == ["rank 0: group up at exit"]


def test_a_deepspeed_distill_runs_its_exit_handlers_and_skips_the_teardown(quick_demo, tmp_path):
    config = write_config(tmp_path / "c.yaml", quick_demo, output_dir=str(tmp_path / "out"),
                          teacher={"checkpoint": str(quick_demo / "teacher")},
                          cache={"dir": str(quick_demo / "cache")},
                          distill={"max_steps": 2, "batch_size": 16})
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                               config_file="configs/accelerate/cpu_zero2.yaml",
                               env=probe_env(tmp_path / "probe"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "student" / "model.safetensors").exists()
    assert exit_marks(tmp_path / "probe") == EXIT_HANDLERS_ONLY

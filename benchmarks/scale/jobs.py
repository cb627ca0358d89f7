"""The benchmark's jobs: real `kdscale cache`, `finetune` and `distill` runs of the
BERT-large-shaped teacher, each launched as a user launches it, with its peak memory per
rank sampled from outside and `kdscale env`'s prediction for the same launch taken first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scale.monitor import PeakMemory
from kdscale.distributed import free_port
from kdscale.train.timing import overall_breakdown

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3 * 3600  # a hung job stops the benchmark; no job of it takes near this


@dataclass
class Launch:
    """How a job is started: processes, and the student's DeepSpeed stage (None: none)."""

    processes: int
    zero_stage: int | None = None

    def accelerate_config(self, work: Path) -> Path | None:
        if self.zero_stage is None:
            return None
        path = work / f"accelerate_zero{self.zero_stage}.yaml"
        ds = REPO / "configs" / "deepspeed" / f"zero{self.zero_stage}.json"
        path.write_text(json.dumps({
            "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
            "deepspeed_config": {"deepspeed_config_file": str(ds), "zero3_init_flag": False},
            "num_machines": 1, "num_processes": self.processes, "machine_rank": 0,
            "rdzv_backend": "static", "same_network": True, "use_cpu": False,
            "mixed_precision": "no"}))
        return path

    def command(self, work: Path, *args: str) -> list[str]:
        if self.processes == 1 and self.zero_stage is None:
            return [sys.executable, "-m", "kdscale", *args]
        config = self.accelerate_config(work)
        shape = ["--config_file", str(config)] if config else [
            "--multi_gpu", "--num_processes", str(self.processes), "--num_machines", "1"]
        return [sys.executable, "-m", "accelerate.commands.launch", *shape, "--mixed_precision",
                "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                "-m", "kdscale", *args]


def job_env(kdscale_src: Path | None) -> dict:
    """The jobs' environment: offline, one thread per process unless set, and optionally
    another checkout's kdscale first on the path (a before-and-after measurement).

    One thread for every job, launched or not: `accelerate launch` gives its processes one
    (OMP_NUM_THREADS=1) while a plain one-process job would take every core, and a CPU
    matrix product splits its sums by the thread count, so the one-process cache would
    differ from the others in the last bits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    if kdscale_src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(kdscale_src),
                                                          env.get("PYTHONPATH")]))
    return env


def predict(config: Path, launch: Launch, work: Path, env: dict) -> dict:
    """`kdscale env --json` for this launch: what the planner expects before the run."""
    args = ["env", "--config", str(config), "--json", "--num_processes", str(launch.processes)]
    accelerate = launch.accelerate_config(work)
    if accelerate:
        args += ["--accelerate_config", str(accelerate)]
    done = subprocess.run([sys.executable, "-m", "kdscale", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"kdscale env failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def run(command: str, config: Path, launch: Launch, work: Path, env: dict) -> dict:
    """One job: its wall time and peak RSS per rank; raises with its stderr if it fails."""
    start = time.perf_counter()
    monitor = PeakMemory(launch.command(work, command, "--config", str(config)), env=env,
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = monitor.wait(TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"kdscale {command} ({launch}) failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 2),
            "peak_rss": [monitor.peaks.get(rank, 0) for rank in range(launch.processes)],
            "peak_anonymous": [monitor.anonymous.get(rank, 0) for rank in range(launch.processes)],
            "peak_device": [monitor.device.get(rank, 0) for rank in range(launch.processes)]
            if monitor.device else None}


def cache_results(cache_dir: Path) -> dict:
    """What `kdscale cache` recorded: throughput and parameters held per rank, shard hashes."""
    build = json.loads((cache_dir / "build.json").read_text())
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    return {"placement": build["placement"], "num_params": build["num_params"],
            "ranks": build["ranks"], "shard_sha256": [s["sha256"] for s in manifest["shards"]]}


def training_results(model_dir: Path) -> dict:
    """Mean step time per phase (ms) over the logged steps after the first log window."""
    log = json.loads((model_dir / "training_log.json").read_text())
    records = [r for r in log if "step_ms" in r]
    return {"step_ms": overall_breakdown(records[1:] or records), "steps": records[-1]["step"]}

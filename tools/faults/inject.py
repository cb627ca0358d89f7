"""Starting a 2-process `kdscale` job and delivering one fault to it, at a seeded point.

A fault waits for its trigger (the k-th shard or checkpoint of the job to appear, then a
seeded delay), so kill points spread over the whole job: start-up, shard and checkpoint
writes, the manifest, the final save. The job's output is read through a pipe, never a
file: a worker under a file-size limit must still be able to print its error.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kdscale.distributed import TIMEOUT_VARIABLE, free_port

REPO = Path(__file__).resolve().parents[2]
KINDS = ("kill_rank", "kill_job", "sigterm", "disk_full", "hung_rank")


@dataclass
class Job:
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    seen: list[psutil.Process] = field(default_factory=list)  # every process of the job met

    def processes(self) -> list[psutil.Process]:
        """The launcher and its descendants now, plus any met before (a worker outlives a
        launcher killed first, and then is no longer under it)."""
        try:
            launcher = psutil.Process(self.process.pid)
            found = [*self.seen, launcher, *launcher.children(recursive=True)]
            self.seen = list({p.pid: p for p in found}.values())
        except psutil.NoSuchProcess:
            pass
        return self.seen

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit status, or None if it is still running after `timeout`."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(timeout=10)
        return status

    def signal_all(self, sig: int) -> bool:
        """`sig` to the launcher and every process under it, as SLURM signals a job step.
        (Not a process group: the launcher puts each worker in a process group of its own.)"""
        alive = False
        for process in self.processes():
            try:
                process.send_signal(sig)  # psutil checks the pid was not reused
                alive = True
            except psutil.NoSuchProcess:
                continue
        return alive

    def kill(self) -> None:
        """SIGKILL to the launcher and every worker (a stopped process dies too)."""
        self.signal_all(signal.SIGKILL)
        self.wait(timeout=60)


def launch(command: str, config: Path, timeout_s: float | None = None) -> Job:
    """`accelerate launch` of 2 gloo processes, in a process group of its own (so that a
    Ctrl-C in the harness's terminal does not reach it). `timeout_s`: the collective timeout,
    else kdscale's default (a short one could fire on a slow start of a loaded machine)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "kdscale", command, "--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    if timeout_s is not None:
        env[TIMEOUT_VARIABLE] = str(timeout_s)
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, preexec_fn=os.setpgrp)
    job = Job(process)
    job.reader = threading.Thread(target=lambda: job.lines.extend(process.stdout), daemon=True)
    job.reader.start()
    return job


def worker(job: Job, rank: int) -> psutil.Process | None:
    """The kdscale process of one rank among the launcher's children."""
    for child in job.processes()[1:]:
        try:
            if "kdscale" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@dataclass
class Fault:
    kind: str
    rank: int  # the victim, where one rank is hit
    after_files: int  # trigger: this many shard sidecars / checkpoint directories seen
    delay_s: float  # then this long
    limit_bytes: int = 0  # disk_full: the victim's file size limit
    early: bool = False  # trigger: the victim's worker started (in its imports), no file yet

    @classmethod
    def draw(cls, rng: random.Random, kind: str, files: int, file_bytes: int,
             early: bool = False) -> Fault:
        after = 0 if early else rng.randrange(files)
        # Files appear milliseconds apart once the work starts; before the first one, the
        # start-up (imports, process group, tokenizing, loading) takes seconds. An early
        # fault waits for the worker, then under a second: a worker spends longer than that
        # importing torch, so it lands before the job's first file.
        if early:
            delay = rng.uniform(0.0, 1.0)
        else:
            delay = rng.uniform(0.0, 10.0) if after == 0 else rng.uniform(0.0, 0.05)
        return cls(kind, rank=rng.randrange(2), after_files=after, delay_s=round(delay, 3),
                   limit_bytes=rng.randrange(1, file_bytes), early=early)


def wait_for_trigger(job: Job, fault: Fault, seen_files, deadline_s: float = 300) -> bool:
    """Waits for `fault.after_files` files (counted by `seen_files()`), or for an early
    fault's victim to start, then the delay. False when the job ended first (the fault then
    lands on nothing)."""
    end = time.monotonic() + deadline_s
    while not _triggered(job, fault, seen_files) and time.monotonic() < end:
        if job.process.poll() is not None:
            return False
        time.sleep(0.01)
    time.sleep(fault.delay_s)
    return job.process.poll() is None


def _triggered(job: Job, fault: Fault, seen_files) -> bool:
    if fault.early:
        return worker(job, fault.rank) is not None
    return seen_files() >= fault.after_files


def deliver(job: Job, fault: Fault) -> bool:
    """Delivers the fault; False when its target was already gone."""
    if fault.kind == "kill_job":
        return job.signal_all(signal.SIGKILL)
    if fault.kind == "sigterm":  # what SLURM does on preemption: every process of the step
        return job.signal_all(signal.SIGTERM)
    victim = _victim(job, fault.rank)
    if victim is None:
        return False
    try:
        if fault.kind == "kill_rank":
            victim.send_signal(signal.SIGKILL)
        elif fault.kind == "hung_rank":
            victim.send_signal(signal.SIGSTOP)
        elif fault.kind == "disk_full":  # the next write past the limit fails with EFBIG
            victim.rlimit(resource.RLIMIT_FSIZE, (fault.limit_bytes, fault.limit_bytes))
    except psutil.NoSuchProcess:
        return False
    return True


def _victim(job: Job, rank: int, wait_s: float = 60) -> psutil.Process | None:
    """The rank's worker, waiting for the launcher to start it if the fault came early."""
    end = time.monotonic() + wait_s
    while job.process.poll() is None and time.monotonic() < end:
        found = worker(job, rank)
        if found is not None:
            return found
        time.sleep(0.05)
    return None


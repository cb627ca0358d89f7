"""Peak resident memory of each rank of a launched job, sampled from outside: every worker
process (found among the launcher's children by its RANK) is read a few times a second, so
a peak shorter than the interval can be missed; loading weights takes seconds, not that.

Two figures per rank: RSS, and its anonymous part (RSS less the file-backed pages, which
the kernel can drop and reread: a memory-mapped checkpoint counts in RSS as it is read)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import psutil

INTERVAL_S = 0.05
GPU_QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


class PeakMemory:
    """Runs a command and records the largest RSS, and anonymous RSS, seen per rank (bytes)."""

    def __init__(self, command: list[str], **popen):
        self.peaks: dict[int, int] = {}
        self.anonymous: dict[int, int] = {}
        self.device: dict[int, int] = {}  # GPU memory per rank, where nvidia-smi is there
        self._gpus = shutil.which("nvidia-smi") is not None
        self.process = subprocess.Popen(command, **popen)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            out, err = self.process.communicate(timeout=timeout)
        finally:
            self._done.set()
            self._thread.join()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, out, err)

    def _sample(self) -> None:
        root = psutil.Process(self.process.pid)
        while not self._done.is_set():
            workers = list(_workers(root))
            for rank, _, memory in workers:
                self.peaks[rank] = max(self.peaks.get(rank, 0), memory.rss)
                anonymous = memory.rss - memory.shared
                self.anonymous[rank] = max(self.anonymous.get(rank, 0), anonymous)
            if self._gpus:
                used = _gpu_memory()
                for rank, pid, _ in workers:
                    self.device[rank] = max(self.device.get(rank, 0), used.get(pid, 0))
            time.sleep(INTERVAL_S)


def _workers(root: psutil.Process):
    """(rank, pid, memory info) of each kdscale process under `root` (a lone one is rank 0)."""
    try:
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            if "kdscale" not in " ".join(process.cmdline()):
                continue
            env = process.environ()
            if "accelerate.commands.launch" in " ".join(process.cmdline()):
                continue  # the launcher itself
            yield int(env.get("RANK", "0")), process.pid, process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def _gpu_memory() -> dict[int, int]:
    """GPU memory in use per process id (bytes), as the driver reports it."""
    done = subprocess.run(GPU_QUERY, capture_output=True, text=True)
    used = {}
    for line in done.stdout.splitlines():
        pid, mib = (field.strip() for field in line.split(","))
        if pid.isdigit() and mib.isdigit():
            used[int(pid)] = int(mib) * 2**20
    return used

"""A training job asked to stop early saves a checkpoint at the next step and exits, so that
rerunning the same command resumes it (preemption, a time limit, an operator).

Two ways to ask, checked every `log_every` optimizer steps (where the loop already syncs
with the device to log; a check costs a collective and a device sync):
- SIGTERM or SIGUSR1 to a worker process (SLURM sends SIGTERM to every process of a job it
  preempts; `torchrun`/`accelerate launch` forward SIGTERM to their workers and give them 30 s);
- the file named by `KDSCALE_STOP_FILE` exists (launch/slurm.sbatch creates it when the time
  limit nears: a file on shared storage reaches every node, a signal to the launcher would not).
Ranks agree before anyone stops (an all-reduce of the flag), so all save the same step.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

STOP_FILE_VARIABLE = "KDSCALE_STOP_FILE"
# SIGINT too: Ctrl-C in a terminal saves a checkpoint like a preemption (twice: stop now).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Exit status of a job stopped on request with its checkpoint saved: not a success (the
# next stage must not start), not a failure (the rerun resumes).
EXIT_STOPPED = 3


class JobStopped(Exception):
    def __init__(self, desc: str, step: int, checkpoint: Path | None):
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no directory)"
        super().__init__(f"{desc}: stopped on request after step {step}, {where}; "
                         f"rerun the same command to resume")


class StopRequest:
    """Set by a stop signal or the stop file; `agreed` asks every process."""

    def __init__(self) -> None:
        self.signalled: str | None = None
        name = os.environ.get(STOP_FILE_VARIABLE)
        self.stop_file = Path(name) if name else None

    def _on_signal(self, signum: int, frame) -> None:
        if self.signalled is not None:  # asked twice: stop now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signalled = signal.Signals(signum).name

    @contextmanager
    def listening(self):
        """Stop signals set the flag instead of killing the process, until the block ends."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def local(self) -> bool:
        return self.signalled is not None or bool(self.stop_file and self.stop_file.exists())

    def agreed(self, accelerator) -> bool:
        import torch  # here: the CLI imports this module before it needs torch

        from kdscale.distributed import reduce_sum

        flag = torch.tensor(int(self.local()), device=accelerator.device)
        return bool(reduce_sum(accelerator, flag).item())

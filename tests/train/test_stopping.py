"""A job asked to stop (SIGTERM, SIGUSR1, Ctrl-C's SIGINT or the stop file) checkpoints at its
next logged step and leaves; rerunning it ends exactly where an uninterrupted run ends. A
checkpoint that cannot be written is named and never loaded."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdscale.config import TrainConfig
from kdscale.train import checkpoint
from kdscale.train.accelerator import make_accelerator
from kdscale.train.checkpoint import CheckpointWriteError, complete_checkpoints
from kdscale.train.loop import train_loop
from kdscale.train.stopping import STOP_FILE_VARIABLE, JobStopped

SETTINGS = TrainConfig(epochs=3, batch_size=4, learning_rate=0.1, warmup_ratio=0.0,
                       max_grad_norm=0.0, weight_decay=0.0, log_every=2, report_to="none")


def train(checkpoints, at_step=None, send=None, settings=SETTINGS) -> torch.Tensor:
    """Trains a linear classifier for 12 steps; `send(step)` runs inside the loss at steps
    listed in `at_step` (to deliver a signal mid-step, as a scheduler would)."""
    accelerator = make_accelerator(settings, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    generator = torch.Generator().manual_seed(1)
    rows = [{"x": x, "labels": torch.tensor(i % 2)}
            for i, x in enumerate(torch.randn(16, 3, generator=generator))]
    loader = torch.utils.data.DataLoader(rows, batch_size=4, collate_fn=lambda batch: {
        "x": torch.stack([r["x"] for r in batch]),
        "labels": torch.stack([r["labels"] for r in batch])})
    calls = []

    def step(model, batch, timer):
        calls.append(1)
        if send and len(calls) == at_step:
            send()
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"],
                                                 reduction="sum")
        return {"loss": loss}

    model, _ = train_loop(model, loader, step, settings, accelerator, desc="test",
                          checkpoints=checkpoints)
    return torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_stops_at_the_next_logged_step_and_the_rerun_matches(tmp_path, stop_signal):
    uninterrupted = train(tmp_path / "whole")
    before = signal.getsignal(stop_signal)
    with pytest.raises(JobStopped, match="stopped on request after step 4"):
        train(tmp_path / "cut", at_step=3, send=lambda: os.kill(os.getpid(), stop_signal))
    assert signal.getsignal(stop_signal) is before  # the loop's handler is gone again
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["step-00000004"]
    resumed = train(tmp_path / "cut")
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


def test_the_stop_file_stops_the_job(tmp_path, monkeypatch):
    stop_file = tmp_path / "STOP"
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(stop_file))
    with pytest.raises(JobStopped, match="after step 6"):
        train(tmp_path / "run", at_step=5, send=stop_file.touch)
    assert complete_checkpoints(tmp_path / "run")[-1].name == "step-00000006"


def test_without_a_request_the_job_runs_to_the_end(tmp_path, monkeypatch):
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(tmp_path / "absent"))
    train(tmp_path / "run")
    assert complete_checkpoints(tmp_path / "run") == []  # checkpoint_every is unset


def test_a_checkpoint_that_cannot_be_written_is_named_and_never_loaded(tmp_path):
    """A full disk while saving (a real file size limit: writes past it fail with EFBIG)."""
    settings = dataclasses.replace(SETTINGS, checkpoint_every=4)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Above what the test prints (its captured output is a file too), below the random states.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))
    try:
        with pytest.raises(CheckpointWriteError, match="could not write checkpoint .*step-0+4"):
            train(tmp_path / "run", settings=settings)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert complete_checkpoints(tmp_path / "run") == []
    uninterrupted = train(tmp_path / "whole", settings=settings)
    torch.testing.assert_close(train(tmp_path / "run", settings=settings), uninterrupted,
                               rtol=0, atol=0)  # with room, the rerun starts over cleanly


class Killed(BaseException):
    """Stands for the SIGKILL that ends a process in the middle of whatever it was doing."""


def test_a_job_killed_while_deleting_an_old_checkpoint_resumes_from_a_whole_one(
        tmp_path, monkeypatch):
    settings = dataclasses.replace(SETTINGS, checkpoint_every=2, keep_checkpoints=1)
    uninterrupted = train(tmp_path / "whole", settings=settings)

    def killed_midway(path, ignore_errors=False):  # the weights go first, then the process
        next(Path(path).glob("model.safetensors")).unlink()
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.shutil, "rmtree", killed_midway)
        with pytest.raises(Killed):
            train(tmp_path / "cut", settings=settings)
    # step 4 was written whole, then its deletion of step 2 was cut short
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["step-00000004"]
    resumed = train(tmp_path / "cut", settings=settings)
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)
    assert not list((tmp_path / "cut").glob(".discarded-*"))  # the leftover was cleared


def test_a_second_signal_stops_the_process_at_once():
    """The first SIGTERM asks for a checkpoint; a second one (an impatient operator, or a
    launcher's escalation) ends the process the default way."""
    script = ("import os, signal\n"
              "from kdscale.train.stopping import StopRequest\n"
              "stop = StopRequest()\n"
              "with stop.listening():\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('first:', stop.signalled, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('still running')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout == "first: SIGTERM\n"
    assert result.returncode == -signal.SIGTERM

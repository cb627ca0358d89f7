"""The student trained by real processes: under DeepSpeed ZeRO-2 and ZeRO-3 it follows the
single-process loss trajectory on the same global batches, its saved weights load with
`transformers` alone, and a killed run resumes to the same student, bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests.support.pipeline import (
    LAUNCH_ENV,
    accelerate_launch,
    kdscale,
    launch_command,
    worker_of_rank,
    write_config,
)

STEPS = 6
EVAL_EVERY = 3


def distill_config(demo: Path, out: Path, **distill) -> Path:
    settings = {"max_steps": STEPS, "epochs": 1.0, "log_every": 1, "batch_size": 16, **distill}
    out.mkdir(parents=True, exist_ok=True)
    return write_config(out / "experiment.yaml", demo, output_dir=str(out),
                        teacher={"checkpoint": str(demo / "teacher")},
                        cache={"dir": str(demo / "cache")},
                        student={"layers": "every_other", "dropout": 0.0},  # no RNG in the path
                        distill=settings)


def history_of(out: Path) -> list[dict]:
    """The loss records of a run's training log."""
    return [r for r in json.loads((out / "student" / "training_log.json").read_text())
            if "loss" in r]


def evals_of(out: Path) -> list[dict]:
    """The evaluations during training (distill.eval_every) of a run's training log."""
    return [r for r in json.loads((out / "student" / "training_log.json").read_text())
            if "eval_accuracy" in r]


@pytest.fixture(scope="module")
def one_process(quick_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    config = distill_config(quick_demo, out, eval_every=EVAL_EVERY)
    result = kdscale("distill", "--config", str(config), cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_student_follows_the_one_process_trajectory(quick_demo, one_process,
                                                              tmp_path, stage):
    # 2 processes x 8 rows: the same global batches of 16 as the one-process run.
    config = distill_config(quick_demo, tmp_path, batch_size=8, eval_every=EVAL_EVERY)
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                               config_file=f"configs/accelerate/cpu_{stage}.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (DEEPSPEED)" in result.stdout
    expected, got = history_of(one_process), history_of(tmp_path)
    assert [h["step"] for h in got] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in got]),
                               torch.tensor([h["loss"] for h in expected]), rtol=2e-3, atol=1e-5)
    assert got[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end once
    # Evaluation split over the processes (ZeRO-3: forwards in lockstep) scores every example
    # once: the same accuracy as one process, up to a near-tie flipped by rounding.
    evals, one_process_evals = evals_of(tmp_path), evals_of(one_process)
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["eval_examples"] == 128 for e in evals)
    for ours, theirs in zip(evals, one_process_evals, strict=True):
        assert ours["eval_accuracy"] == pytest.approx(theirs["eval_accuracy"], abs=1.5 / 128)

    # The saved student is a plain transformers model with the trained (gathered) weights.
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    reference = AutoModelForSequenceClassification.from_pretrained(one_process / "student")
    inputs = {"input_ids": torch.tensor([[2, 40, 51, 77, 3], [2, 12, 30, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, reference.eval()(**inputs).logits,
                                   rtol=1e-2, atol=1e-3)


def test_a_killed_run_resumes_to_the_same_student(quick_demo, tmp_path):
    settings = {"max_steps": 30, "checkpoint_every": 5, "batch_size": 8}
    uninterrupted = tmp_path / "uninterrupted"
    config = distill_config(quick_demo, uninterrupted, **settings)
    _set_dropout(config, 0.1)  # resume must restore every process's random state too
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    config = distill_config(quick_demo, killed, **settings)
    _set_dropout(config, 0.1)
    command = launch_command("-m", "kdscale", "distill", "--config", config)
    process = subprocess.Popen(command, env=LAUNCH_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    marker = killed / "checkpoints" / "distill" / "step-00000005" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.02)
    victim = worker_of_rank(psutil.Process(process.pid), rank=1)
    assert victim is not None, "rank 1 was not found"
    victim.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (killed / "student").exists(), "the run finished before the kill"

    result = accelerate_launch("-m", "kdscale", "distill", "--config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    losses = [[(h["step"], h["loss"], h["lr"]) for h in history_of(run)]
              for run in (uninterrupted, killed)]
    assert losses[0] == losses[1]
    weights = [load_file(run / "student" / "model.safetensors") for run in (uninterrupted, killed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _set_dropout(config: Path, value: float) -> None:
    settings = json.loads(config.read_text())
    settings["student"]["dropout"] = value
    config.write_text(json.dumps(settings))


def test_online_zero3_teacher_beside_a_zero2_student(quick_demo, one_process, tmp_path):
    config = distill_config(quick_demo, tmp_path, batch_size=8, eval_every=EVAL_EVERY)
    settings = json.loads(config.read_text())
    settings["teacher"].update(source="online", placement="zero3")
    settings["loss"].update(hidden_mse=1.0, attention_kl=0.5)
    config.write_text(json.dumps(settings))
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                               config_file="configs/accelerate/cpu_zero2.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher placement: zero3" in result.stdout
    assert "2 process(es) (DEEPSPEED)" in result.stdout
    history, cached = history_of(tmp_path), history_of(one_process)
    assert all(h["hidden_mse"] > 0 and h["attention_kl"] > 0 for h in history)
    # The breakdown shows the online teacher's forwards (a cached run has none).
    assert all(h["step_ms"]["teacher"] > 0 for h in history)
    assert all(h["step_ms"]["teacher"] == 0 for h in cached)
    # Step 1 sees the same batch and weights: the online teacher's KL term is the cached
    # teacher's, up to the cache's fp16 storage.
    assert history[0]["soft"] == pytest.approx(cached[0]["soft"], rel=1e-2)
    saved = load_file(tmp_path / "student" / "model.safetensors")
    plain = load_file(one_process / "student" / "model.safetensors")
    assert saved.keys() == plain.keys()  # the student alone: no projections, no prefix
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    best = load_file(tmp_path / "student_best" / "model.safetensors")
    assert best.keys() == plain.keys()  # the best student is saved the same way

"""The student trained by real processes: under DeepSpeed ZeRO-2 and ZeRO-3 it follows the
single-process loss trajectory on the same global batches, its saved weights load with
`transformers` alone, and a killed run resumes to the same student, bit for bit. A stopped
run resumes as kdscale/train/checkpoint.py promises for its launch: a plain 2-process
checkpoint on 1 process with the same global batch (another one is refused), a ZeRO-3 one
under the same launch only, bit for bit."""

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

from kdscale.files import sha256_file
from kdscale.train.checkpoint import complete_checkpoints
from kdscale.train.stopping import STOP_FILE_VARIABLE
from tests.support.pipeline import (
    LAUNCH_ENV,
    accelerate_launch,
    kdscale,
    launch_command,
    worker_of_rank,
    write_config,
)

pytestmark = pytest.mark.slow  # real launches: scheduled first (tests/conftest.py)

STEPS = 6
EVAL_EVERY = 3
STOP_AFTER = 2  # a stopped run logs every 2 steps, so the stop file stops it after step 2
ZERO3 = "configs/accelerate/cpu_zero3.yaml"
WALL_CLOCK = {"seconds", "step_ms", "timed_steps"}  # the only fields two runs may differ in


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


def deepspeed_run(demo: Path, out: Path, stage: str) -> Path:
    """2 processes x 8 rows under ZeRO-`stage`: the one-process run's global batches of 16."""
    config = distill_config(demo, out, batch_size=8, eval_every=EVAL_EVERY)
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                               config_file=f"configs/accelerate/cpu_{stage}.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) (DEEPSPEED)" in result.stdout
    return out


@pytest.fixture(scope="module")
def zero3_run(quick_demo, tmp_path_factory) -> Path:
    """The uninterrupted ZeRO-3 run: followed by a trajectory test, resumed to by another."""
    return deepspeed_run(quick_demo, tmp_path_factory.mktemp("zero3"), "zero3")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_student_follows_the_one_process_trajectory(quick_demo, one_process,
                                                              tmp_path, stage, request):
    run = request.getfixturevalue("zero3_run") if stage == "zero3" else \
        deepspeed_run(quick_demo, tmp_path, stage)
    expected, got = history_of(one_process), history_of(run)
    assert [h["step"] for h in got] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in got]),
                               torch.tensor([h["loss"] for h in expected]), rtol=2e-3, atol=1e-5)
    assert got[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end once
    # Evaluation split over the processes (ZeRO-3: forwards in lockstep) scores every example
    # once: the same accuracy as one process, up to a near-tie flipped by rounding.
    evals, one_process_evals = evals_of(run), evals_of(one_process)
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["eval_examples"] == 128 for e in evals)
    for ours, theirs in zip(evals, one_process_evals, strict=True):
        assert ours["eval_accuracy"] == pytest.approx(theirs["eval_accuracy"], abs=1.5 / 128)

    # The saved student is a plain transformers model with the trained (gathered) weights.
    assert_same_predictions(run / "student", one_process / "student")


def assert_same_predictions(student: Path, reference: Path) -> None:
    """Two saved students give the same logits, up to the rounding of other reductions."""
    models = [AutoModelForSequenceClassification.from_pretrained(p).eval()
              for p in (student, reference)]
    inputs = {"input_ids": torch.tensor([[2, 40, 51, 77, 3], [2, 12, 30, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(models[0](**inputs).logits, models[1](**inputs).logits,
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


def stopped_run(demo: Path, out: Path, config_file: str | None = None, **distill) -> Path:
    """A 2-process run asked to stop before it starts (the stop file exists): at its first
    logged step every process agrees to stop, saves a checkpoint and exits with status 3.
    Returns the checkpoint."""
    config = distill_config(demo, out, log_every=STOP_AFTER, **distill)
    stop_file = out / "STOP"
    stop_file.touch()
    result = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                               config_file=config_file, env={STOP_FILE_VARIABLE: str(stop_file)})
    assert result.returncode != 0, "a stopped job is not a finished one"
    assert f"stopped on request after step {STOP_AFTER}" in result.stderr, result.stderr[-3000:]
    stop_file.unlink()
    checkpoints = complete_checkpoints(out / "checkpoints" / "distill")
    assert [p.name for p in checkpoints] == [f"step-{STOP_AFTER:08d}"]
    assert json.loads((checkpoints[0] / "trainer_state.json").read_text())["launch"][
        "processes"] == 2
    return checkpoints[0]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(
        quick_demo, one_process, tmp_path):
    """kdscale/train/checkpoint.py: a plain checkpoint resumes under another world size when
    the global batch is the same (the data order and every step depend on it alone), and is
    refused, before anything is written, when it is not."""
    checkpoint = stopped_run(quick_demo, tmp_path, batch_size=8, eval_every=None)  # 2 x 8
    written = digests(tmp_path / "checkpoints")
    config = distill_config(quick_demo, tmp_path, batch_size=8, eval_every=None)  # 1 x 8
    refused = kdscale("distill", "--config", str(config), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"checkpoint {checkpoint} was written with a global batch of 16 rows (2 process(es)"
            f" x distill.batch_size 8); this run has 8 (1 x 8)") in refused.stderr
    assert digests(tmp_path / "checkpoints") == written and not (tmp_path / "student").exists()

    config = distill_config(quick_demo, tmp_path, batch_size=16, eval_every=None)  # 1 x 16
    resumed = kdscale("distill", "--config", str(config), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {STOP_AFTER})" in resumed.stdout
    got, expected = history_of(tmp_path), history_of(one_process)
    assert [h["step"] for h in got] == [2, 3, 4, 5, 6]  # the 2-process record kept, none twice
    # Steps 1-2 on two processes, then 3-6 on one: the one-process trajectory (step 2's
    # record is the mean over steps 1 and 2, 16 rows each).
    losses = [sum(h["loss"] for h in expected[:2]) / 2, *(h["loss"] for h in expected[2:])]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in got]), torch.tensor(losses),
                               rtol=2e-3, atol=1e-5)
    assert [h["lr"] for h in got] == pytest.approx([h["lr"] for h in expected[1:]], rel=1e-6)
    # The same student up to the rounding of a 2-process all-reduce (measured: 6e-7 at most).
    weights = [load_file(run / "student" / "model.safetensors") for run in (tmp_path, one_process)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-5)


def test_a_stopped_zero3_run_resumes_to_the_uninterrupted_zero3_student(quick_demo, zero3_run,
                                                                        tmp_path):
    """ZeRO-3 partitions the weights and the optimizer state by process: the checkpoint
    resumes under the launch that wrote it, to the uninterrupted run's student bit for bit
    (docs/clusters.md), and is refused on another number of processes."""
    checkpoint = stopped_run(quick_demo, tmp_path, ZERO3, batch_size=8, eval_every=EVAL_EVERY)
    config = distill_config(quick_demo, tmp_path, batch_size=8, eval_every=EVAL_EVERY)
    alone = accelerate_launch("--num_processes", "1", "-m", "kdscale", "distill", "--config",
                              config, config_file=ZERO3)
    assert alone.returncode != 0
    assert (f"checkpoint {checkpoint} holds DeepSpeed ZeRO state of 2 process(es); this run has "
            f"1 process(es) under DeepSpeed") in alone.stderr, alone.stderr[-3000:]

    resumed = accelerate_launch("-m", "kdscale", "distill", "--config", config,
                                config_file=ZERO3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {STOP_AFTER})" in resumed.stdout
    ours = json.loads((tmp_path / "student" / "training_log.json").read_text())
    theirs = json.loads((zero3_run / "student" / "training_log.json").read_text())
    # Every loss, learning rate and evaluation after the stop is the uninterrupted run's.
    assert stable([r for r in ours if r["step"] > STOP_AFTER]) == \
        stable([r for r in theirs if r["step"] > STOP_AFTER])
    weights = [load_file(run / "student" / "model.safetensors") for run in (tmp_path, zero3_run)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

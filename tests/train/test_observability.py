"""What a run shows of itself: TensorBoard scalars, the step-time breakdown, evaluation every
n steps with the best student kept; and a pretrained student from its own checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from kdscale.train.timing import PHASES, StepTimer, overall_breakdown
from tests.support.pipeline import kdscale, write_config


def test_the_timer_attributes_each_phase_and_starts_a_new_window():
    timer = StepTimer(sync=False)
    for _ in range(2):
        with timer.phase("forward"):
            time.sleep(0.02)
        with timer.phase("backward"):
            pass
        timer.end_step()
    means, steps = timer.take()
    assert steps == 2
    assert means["forward"] >= 20 and means["forward"] > means["backward"]
    assert means["step"] == pytest.approx(sum(means[p] for p in PHASES), abs=1e-2)
    assert timer.take() == ({**dict.fromkeys(PHASES, 0.0), "step": 0.0}, 0)


def test_the_run_breakdown_weighs_each_record_by_its_steps():
    history = [{"step": 3, "step_ms": {"forward": 10.0, "step": 10.0}, "timed_steps": 3},
               {"step": 3, "eval_accuracy": 0.5},  # eval records carry no timings
               {"step": 4, "step_ms": {"forward": 30.0, "step": 30.0}, "timed_steps": 1}]
    assert overall_breakdown(history) == {"forward": 15.0, "step": 15.0}
    assert overall_breakdown([{"step": 1, "loss": 0.3}]) is None


@pytest.fixture(scope="module")
def observed_run(quick_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("observed")
    config = write_config(out / "c.yaml", quick_demo, output_dir=str(out),
                          teacher={"checkpoint": str(quick_demo / "teacher")},
                          cache={"dir": str(quick_demo / "cache")},
                          distill={"max_steps": 9, "log_every": 3, "eval_every": 3,
                                   "batch_size": 16})
    result = kdscale("distill", "--config", str(config), cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step time" in result.stdout and "eval accuracy" in result.stdout
    return out


def test_tensorboard_receives_losses_timings_and_evaluations(observed_run):
    events = EventAccumulator(str(observed_run / "logs" / "distill")).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("loss", "soft", "hard", "lr", "step_ms/forward", "step_ms/data",
                "eval_accuracy"):
        assert tag in scalars, tag
        assert [e.step for e in events.Scalars(tag)] == [3, 6, 9]
    history = json.loads((observed_run / "student" / "training_log.json").read_text())
    losses = [r["loss"] for r in history if "loss" in r]
    logged = [e.value for e in events.Scalars("loss")]
    assert logged == pytest.approx(losses, rel=1e-6)


def test_the_breakdown_covers_every_step_of_a_cached_run(observed_run):
    history = json.loads((observed_run / "student" / "training_log.json").read_text())
    timed = [r for r in history if "step_ms" in r]
    assert sum(r["timed_steps"] for r in timed) == 9
    for record in timed:
        times = record["step_ms"]
        assert times["teacher"] == 0  # the cache stands in for the teacher
        assert all(times[p] > 0 for p in ("data", "forward", "loss", "backward", "optimizer"))
        assert times["step"] == pytest.approx(sum(times[p] for p in PHASES), abs=0.01)


def test_the_best_student_is_kept_and_scores_what_was_logged(observed_run, quick_demo):
    from kdscale.commands.demo import demo_config
    from kdscale.data import PaddingCollator, make_loader, tokenize_labelled
    from kdscale.models import load_tokenizer
    from kdscale.tasks.classification_metrics import predict

    history = json.loads((observed_run / "student" / "training_log.json").read_text())
    evals = [r for r in history if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]
    best = max(evals, key=lambda r: r["eval_accuracy"])
    assert best["best"] and sum(r["best"] for r in evals) >= 1

    config = demo_config(str(quick_demo), {"data": {"max_eval_examples": 128}})
    tokenizer = load_tokenizer(quick_demo / "teacher")
    data = tokenize_labelled(config.data, tokenizer, "eval", ["0", "1"])
    loader = make_loader(data, 64, PaddingCollator(tokenizer.pad_token_id), shuffle=False)
    student = AutoModelForSequenceClassification.from_pretrained(observed_run / "student_best")
    preds, labels = predict(student, loader)
    assert (preds == labels).float().mean().item() == pytest.approx(best["eval_accuracy"])


def save_pretrained_student(directory: Path, vocab_size: int, layers: int = 3) -> Path:
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64)).save_pretrained(directory)
    return directory


def test_a_pretrained_student_of_another_width_is_distilled(quick_demo, tmp_path):
    vocab = json.loads((quick_demo / "teacher" / "config.json").read_text())["vocab_size"]
    pretrained = save_pretrained_student(tmp_path / "small", vocab)
    config = write_config(tmp_path / "c.yaml", quick_demo, output_dir=str(tmp_path / "out"),
                          teacher={"checkpoint": str(quick_demo / "teacher")},
                          cache={"dir": str(quick_demo / "cache")},
                          student={"model": str(pretrained), "layers": "first:2"},
                          distill={"max_steps": 3, "report_to": "none"})
    result = kdscale("distill", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"layers first:2 of {pretrained}" in result.stdout
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (64, 2)
    assert not (tmp_path / "out" / "logs").exists()  # report_to: none


@pytest.mark.parametrize("student, distill, message", [
    ({"model": "VOCAB"}, {}, "has a vocabulary of 50 tokens, the teacher 114"),
    ({}, {"report_to": "tensorbored"}, "distill.report_to: unknown tracker tensorbored"),
    ({}, {"eval_every": 0}, "distill.eval_every: expected an integer > 0 or null"),
    ({"model": "missing"}, {}, "student.model checkpoint missing has no config.json"),
])
def test_bad_student_or_tracking_settings_stop_at_start(quick_demo, tmp_path, student, distill,
                                                       message):
    if student.get("model") == "VOCAB":
        student = {"model": str(save_pretrained_student(tmp_path / "other_vocab", 50))}
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", quick_demo, output_dir=str(out),
                          teacher={"checkpoint": str(quick_demo / "teacher")},
                          cache={"dir": str(quick_demo / "cache")}, student=student,
                          distill=distill)
    result = kdscale("distill", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()

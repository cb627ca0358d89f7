"""The distillation objective: several teachers averaged in probability space, at the
distillation temperature; a hard-label run with no teacher output."""

from __future__ import annotations

import json

import pytest
import torch

from kdscale.train.losses import KDLoss
from kdscale.train.objective import ensemble_logits
from tests.support.pipeline import kdscale, write_config


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_ensemble_logits_give_the_weighted_mean_of_probabilities(temperature):
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 3  # (K, B, C)
    weights = [1.0, 2.0, 5.0]
    mixed = ensemble_logits(logits, weights, temperature)
    expected = sum(w / 8.0 * torch.softmax(z / temperature, dim=-1)
                   for w, z in zip(weights, logits, strict=True))
    torch.testing.assert_close(torch.softmax(mixed / temperature, dim=-1), expected)


def test_equal_weights_are_the_default():
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ensemble_logits(logits, None, 2.0),
                               ensemble_logits(logits, [5.0, 5.0], 2.0))


def test_an_ensemble_of_one_teacher_twice_distills_like_that_teacher(quick_demo, tmp_path):
    histories = []
    for name, cache in (("single", {}), ("ensemble", {
            "ensemble": [str(quick_demo / "cache")] * 2, "ensemble_weights": [0.3, 0.7]})):
        out = tmp_path / name
        out.mkdir()
        config = write_config(out / "c.yaml", quick_demo, output_dir=str(out),
                              teacher={"checkpoint": str(quick_demo / "teacher")},
                              cache={"dir": str(quick_demo / "cache"), **cache},
                              distill={"max_steps": 4, "log_every": 1})
        result = kdscale("distill", "--config", str(config), cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        histories.append(json.loads((out / "student" / "training_log.json").read_text()))
    assert "2 caches averaged" in result.stdout
    for single, ensemble in zip(*histories, strict=True):
        assert ensemble["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_a_hard_label_loss_needs_no_teacher_output():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(6, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 2, -100, 1, 1, 0])
    loss = KDLoss(temperature=2.0, alpha=0.0)
    alone = loss.parts(student, labels=labels)
    with_teacher = loss.parts(student, torch.randn(6, 3, generator=gen), labels=labels)
    torch.testing.assert_close(alone["loss"], with_teacher["loss"])
    assert alone["soft"] == 0
    grad_alone, = torch.autograd.grad(alone["loss"], student)
    grad_teacher, = torch.autograd.grad(with_teacher["loss"], student)
    torch.testing.assert_close(grad_alone, grad_teacher)
    with pytest.raises(ValueError, match="alpha 0.5"):
        KDLoss(alpha=0.5).parts(student, labels=labels)


def test_a_hard_label_run_reads_no_cache(quick_demo, tmp_path):
    config = write_config(tmp_path / "c.yaml", quick_demo, output_dir=str(tmp_path / "run"),
                          teacher={"checkpoint": str(quick_demo / "teacher")},
                          cache={"dir": str(tmp_path / "no-cache-here")}, loss={"alpha": 0.0},
                          distill={"max_steps": 3, "log_every": 1})
    result = kdscale("distill", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hard labels only" in result.stdout
    history = json.loads((tmp_path / "run" / "student" / "training_log.json").read_text())
    assert len(history) == 3
    assert all(row["soft"] == 0 and row["hard"] == row["loss"] > 0 for row in history)
    assert not (tmp_path / "no-cache-here").exists()

"""Several teachers averaged in probability space, at the distillation temperature."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import kdscale, write_config

from kdscale.objective import ensemble_logits


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

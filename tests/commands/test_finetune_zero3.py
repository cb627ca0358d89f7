"""`kdscale finetune` under ZeRO-3 with 2 real processes: the teacher loads straight into
shards (no process ever holds it whole), trains, and saves a whole model."""

from __future__ import annotations

import json
import re

import torch
from transformers import AutoModelForSequenceClassification

from tests.support.pipeline import accelerate_launch, write_config


def test_a_zero3_teacher_loads_into_shards_and_saves_whole(quick_demo, tmp_path):
    teacher_dir = tmp_path / "teacher"
    config = write_config(tmp_path / "experiment.yaml", quick_demo, output_dir=str(tmp_path),
                          teacher={"checkpoint": str(teacher_dir)},
                          finetune={"max_steps": 8, "log_every": 1, "batch_size": 8})
    result = accelerate_launch("-m", "kdscale", "finetune", "--config", config,
                               config_file="configs/accelerate/cpu_zero3.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    held = {int(rank): (int(part.replace(",", "")), int(total.replace(",", ""))) for
            rank, part, total in re.findall(r"process (\d) holds ([\d,]+) of ([\d,]+) parameters",
                                            result.stdout)}
    assert set(held) == {0, 1}, result.stdout[-2000:]
    for part, total in held.values():
        assert 0.45 * total <= part <= 0.55 * total  # a half, with the partitions' padding
    log = json.loads((teacher_dir / "training_log.json").read_text())
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    saved = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    assert sum(p.numel() for p in saved.parameters()) == next(iter(held.values()))[1]

"""The training loop's arithmetic: a step's loss is the mean over all valid rows of all its
micro-batches, so accumulation changes nothing but memory; and an update that overflows the
weights stops the run though its loss was finite."""

from __future__ import annotations

import pytest
import torch

from kdscale.config import TrainConfig
from kdscale.train.accelerator import make_accelerator
from kdscale.train.guard import NonFiniteError
from kdscale.train.loop import train_loop

# Rows 0-3 hold 2 valid labels, rows 4-7 hold 3: per-micro-batch means would weigh them wrong.
LABELS = torch.tensor([0, 1, -100, -100, -100, 1, 0, 1] * 2)


def train(batch_size: int, accumulation: int,
          learning_rate: float = 0.1) -> tuple[torch.Tensor, list[dict]]:
    settings = TrainConfig(epochs=1, batch_size=batch_size, learning_rate=learning_rate,
                           warmup_ratio=0.0, gradient_accumulation_steps=accumulation,
                           max_grad_norm=0.0, weight_decay=0.0, log_every=1)
    accelerator = make_accelerator(settings, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    features = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    rows = [{"x": features[i], "labels": LABELS[i]} for i in range(16)]
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=lambda batch: {
        "x": torch.stack([r["x"] for r in batch]),
        "labels": torch.stack([r["labels"] for r in batch])})

    def step(model, batch, timer):
        logits = model(batch["x"])
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["labels"],
                                                          reduction="sum")}

    model, history = train_loop(model, loader, step, settings, accelerator, desc="test")
    trained = accelerator.unwrap_model(model)
    weights = torch.cat([p.detach().flatten() for p in trained.parameters()])
    return weights, history


def test_accumulated_micro_batches_equal_one_batch():
    whole, whole_history = train(batch_size=8, accumulation=1)
    split, split_history = train(batch_size=4, accumulation=2)
    assert len(whole_history) == len(split_history) == 2
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    # The rows are summed in another order (by micro-batch, and by the CPU's kernels), so the
    # fp32 sums may differ in the last bit; a per-micro-batch mean would move them by percents.
    for a, b in zip(whole_history, split_history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
    assert [h["lr"] for h in split_history] == [0.05, 0.0]  # one scheduler step per step


def test_an_update_past_float32s_range_stops_the_run_at_its_last_step_naming_the_rate():
    """One step, no checkpoints: its loss is finite, the update it drives overflows the
    weights, and the trained model is refused with the key to change."""
    with pytest.raises(NonFiniteError) as raised:
        train(batch_size=16, accumulation=1, learning_rate=1e39)
    assert str(raised.value) == (
        "test: the weights are not finite at step 1 (its loss was still finite); the weights "
        "diverged: expected a smaller train.learning_rate (now 1e+39); the trained model is not "
        "written and the previous one, if any, is kept")

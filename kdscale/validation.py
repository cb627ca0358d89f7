"""Evaluation during training: every `eval_every` optimizer steps (and after the last), the
model is scored on the eval split by all processes together, and the best model so far is
saved with `save_pretrained`, so a run that overfits late still leaves its best student."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from kdscale.checkpoint import Progress
from kdscale.train import model_inputs

METRIC = "eval_accuracy"


class PeriodicEval:
    """`loader` yields global eval batches (see make_loader); each process scores its part,
    so a ZeRO-3 model runs its forwards in lockstep on every rank. `save_best(model, history)`
    is called on every process (saving gathers ZeRO-3 weights collectively)."""

    def __init__(self, accelerator: Accelerator, loader, every: int,
                 save_best: Callable[[torch.nn.Module, list[dict]], None]):
        self.accelerator, self.every, self.save_best = accelerator, every, save_best
        self.loader = accelerator.prepare_data_loader(loader)

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    def run(self, model: torch.nn.Module, progress: Progress, history: list[dict]) -> dict:
        """Scores the model; saves it when it beats every earlier evaluation in `history`
        (which survives a resume). Returns the eval record for the history."""
        record = {"step": progress.step, "epoch": progress.epoch, **self.score(model)}
        best = best_eval(history)
        record["best"] = best is None or record[METRIC] > best[METRIC]
        self.accelerator.print(f"step {progress.step}: eval accuracy {record[METRIC]:.4f}"
                               + (" (best so far, saved)" if record["best"] else ""))
        if record["best"]:
            self.save_best(model, [*history, record])
        self.accelerator.log({METRIC: record[METRIC]}, step=progress.step)
        return record

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> dict:
        model.eval()
        correct, total = torch.zeros((), dtype=torch.long, device=self.accelerator.device), 0
        for batch in self.loader:
            preds = model(**model_inputs(batch)).logits.argmax(-1)
            preds, labels = self.accelerator.gather_for_metrics((preds, batch["labels"]))
            correct += (preds == labels).sum()  # summed on the device: one sync, at the end
            total += len(labels)
        model.train()
        return {METRIC: correct.item() / max(total, 1), "eval_examples": total}


def best_eval(history: list[dict]) -> dict | None:
    """The best evaluation record of a training history (the model in the best directory)."""
    evals = [r for r in history if METRIC in r]
    return max(evals, key=lambda r: r[METRIC]) if evals else None

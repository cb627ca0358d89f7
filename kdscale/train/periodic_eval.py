"""Evaluation during training: every `eval_every` optimizer steps (and after the last), the
model is scored on the eval split by all processes together, and the best model so far is
saved with `save_pretrained`, so a run that overfits late still leaves its best student."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from kdscale.data.batch import IGNORE_INDEX, model_inputs
from kdscale.tasks import Task, get_task
from kdscale.train.checkpoint import Progress

METRIC = "eval_accuracy"


class PeriodicEval:
    """`loader` yields global eval batches (see make_loader); each process scores its part,
    so a ZeRO-3 model runs its forwards in lockstep on every rank. `save_best(model, history)`
    is called on every process (saving gathers ZeRO-3 weights collectively)."""

    def __init__(self, accelerator: Accelerator, loader, every: int,
                 save_best: Callable[[torch.nn.Module, list[dict]], None],
                 task: Task | None = None):
        self.accelerator, self.every, self.save_best = accelerator, every, save_best
        self.task = task or get_task("classification")
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
        """Accuracy over the eval split's label entries: classes, masked tokens, tags, or
        answer start and end positions. Counted per example, so `gather_for_metrics` can
        drop the examples a last uneven batch repeats."""
        model.eval()
        device = self.accelerator.device
        correct, total = torch.zeros((), dtype=torch.long, device=device), 0
        for batch in self.loader:
            hits, entries = self._per_example(model, batch)
            hits, entries = self.accelerator.gather_for_metrics((hits, entries))
            correct += hits.sum()  # summed on the device: one sync, at the end
            total += int(entries.sum())
        model.train()
        return {METRIC: correct.item() / max(total, 1), "eval_examples": total}

    def _per_example(self, model: torch.nn.Module, batch: dict):
        label_logits = self.task.label_logits(model(**model_inputs(batch)), batch)
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        hits = (label_logits.argmax(-1) == labels) & valid
        if labels.dim() == 1:
            return hits.long(), valid.long()
        return hits.flatten(1).sum(1), valid.flatten(1).sum(1)


def best_eval(history: list[dict]) -> dict | None:
    """The best evaluation record of a training history (the model in the best directory)."""
    evals = [r for r in history if METRIC in r]
    return max(evals, key=lambda r: r[METRIC]) if evals else None

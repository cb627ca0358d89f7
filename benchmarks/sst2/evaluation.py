"""One evaluator for every model of the benchmark: the same dev rows and held-out test rows,
the same batches, the same timing batch, scored by kdscale's own evaluation functions."""

from __future__ import annotations

import dataclasses
import time

import torch

from benchmarks.sst2.split import HeldOut, ids_sha256
from kdscale.commands.evaluate import evaluate_model, median_length_batch
from kdscale.config import Config
from kdscale.data import PaddingCollator, make_loader, tokenize_labelled
from kdscale.models import label_names, load_model, load_tokenizer
from kdscale.tasks.classification_metrics import classification_metrics, predict


class Evaluator:
    """Dev accuracy, F1 and latency, and test accuracy and F1, of any sequence classifier."""

    def __init__(self, config: Config, split: HeldOut):
        self.tokenizer = load_tokenizer(config.teacher_dir)
        self.batch_size = config.eval.batch_size
        self.labels = label_names(load_model(config.teacher_dir, "teacher"))
        dev = tokenize_labelled(config.data, self.tokenizer, "eval", self.labels)
        test_data = dataclasses.replace(config.data, eval_file=str(split.test_file))
        test = tokenize_labelled(test_data, self.tokenizer, "eval", self.labels)
        self.dev, self.test = self.loader(dev), self.loader(test)
        self.timing_batch = median_length_batch(self.dev)
        self.repeats = config.eval.latency_batches
        # Dev rows by their place in dev.tsv; test rows by theirs in the source train.tsv
        # (their place in the split's own test.tsv would say nothing of which rows they are).
        test_ids = [split.test_rows[i] for i in test.dataset["example_id"]]
        self.rows = {"dev": self.describe(dev.dataset["example_id"]),
                     "test": {**self.describe(test_ids), **split.summary()}}

    def loader(self, data):
        return make_loader(data, self.batch_size, PaddingCollator(self.tokenizer.pad_token_id),
                           shuffle=False)

    @staticmethod
    def describe(ids: list[int]) -> dict:
        return {"examples": len(ids), "example_ids_sha256": ids_sha256(ids)}

    def evaluate(self, model: torch.nn.Module, seconds: float, **extra) -> dict:
        """Dev metrics at the top level (as earlier results recorded them), test metrics
        under "test". On the CPU, as `kdscale eval` scores models."""
        model = model.cpu()
        metrics = evaluate_model(model, self.dev, self.timing_batch, self.repeats)
        test = classification_metrics(*predict(model, self.test), model.config.num_labels)
        return {**extra, **metrics, "test": test, "train_s": round(seconds, 2)}


def timed(fn, *args):
    """fn(*args) and the seconds it took: a stage's time, as every record's train_s gives it."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start

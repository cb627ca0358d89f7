"""Sentence (and sentence-pair) classification: one label per example (SST-2, MNLI, ...)."""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from transformers import AutoModelForSequenceClassification

from kdscale.config import Config
from kdscale.data import TaskData, tokenize_labelled
from kdscale.tasks.base import CacheLayout, Task
from kdscale.tasks.classification_metrics import classification_metrics, predict


class SequenceClassification(Task):
    name = "classification"
    model_class = AutoModelForSequenceClassification
    primary_metric = "accuracy"

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        return tokenize_labelled(config.data, tokenizer, split, label_names)

    def transfer_set(self, config: Config, tokenizer,
                     label_names: list[str] | None = None) -> TaskData:
        return tokenize_labelled(config.data, tokenizer, "train", label_names, augment=True)

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        layout = super().cache_layout(config, model_config)
        data = config.data
        # Recorded so that a cache of another transfer set (other copies, other unlabelled
        # rows, or none) is refused by name, not only by its data fingerprint.
        masking = {}
        if data.augment.copies:
            masking["augment"] = asdict(data.augment)
        if data.unlabelled_file is not None:
            masking["unlabelled"] = {"max_examples": data.max_unlabelled_examples}
        return replace(layout, masking=masking) if masking else layout

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        preds, labels = predict(model, loader)
        return classification_metrics(preds, labels, data.num_labels)

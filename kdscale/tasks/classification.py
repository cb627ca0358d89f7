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
        if not config.data.augment.copies:
            return layout
        # Recorded so that a cache of other copies (or none) is refused by name.
        return replace(layout, masking={"augment": asdict(config.data.augment)})

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        preds, labels = predict(model, loader)
        return classification_metrics(preds, labels, data.num_labels)

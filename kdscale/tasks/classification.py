"""Sentence (and sentence-pair) classification: one label per example (SST-2, MNLI, ...)."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from kdscale.config import Config
from kdscale.data import TaskData, prepare
from kdscale.tasks.base import Task


class SequenceClassification(Task):
    name = "classification"
    model_class = AutoModelForSequenceClassification
    primary_metric = "accuracy"

    def prepare(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        return prepare(config.data, tokenizer, split, label_names)

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        from kdscale.evaluation import classification_metrics, predict

        preds, labels = predict(model, loader)
        return classification_metrics(preds, labels, data.num_labels)

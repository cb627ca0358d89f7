"""Accuracy and F1 of a sequence classifier."""

from __future__ import annotations

import torch

from kdscale.data.batch import model_inputs


@torch.inference_mode()
def predict(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    preds, labels = [], []
    for batch in loader:
        preds.append(model(**model_inputs(batch)).logits.argmax(-1))
        labels.append(batch["labels"])
    return torch.cat(preds), torch.cat(labels)


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    metrics = {"accuracy": (preds == labels).float().mean().item(), "examples": len(labels)}
    if num_labels == 2:  # F1 of the positive class (label 1), as GLUE reports it
        tp = ((preds == 1) & (labels == 1)).sum().item()
        predicted, actual = (preds == 1).sum().item(), (labels == 1).sum().item()
        metrics["f1"] = 2 * tp / (predicted + actual) if predicted + actual else 0.0
    return metrics

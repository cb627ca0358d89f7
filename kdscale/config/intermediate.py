"""Which losses beyond logits a run asks for (`loss.hidden_mse`, `hidden_cosine`,
`attention_kl`, `layer_map`), checked; the losses themselves are `kdscale.train.intermediate`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdscale.config.schema import LossConfig
from kdscale.errors import KdscaleError

WEIGHTS = ("hidden_mse", "hidden_cosine", "attention_kl")


@dataclass
class IntermediateConfig:
    hidden_mse: float = 0.0  # weight of TinyBERT's projected hidden-state MSE
    hidden_cosine: float = 0.0  # weight of DistilBERT's cosine loss (equal widths only)
    attention_kl: float = 0.0  # weight of the attention KL (needs eager attention)
    layer_map: dict | str = "uniform"  # {student layer: teacher layer}, or "uniform"
    embeddings: bool = False  # hidden-state losses also match the embedding outputs

    def __post_init__(self) -> None:
        for name in WEIGHTS:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value >= 0):
                raise KdscaleError(f"intermediate.{name}: expected a number >= 0, got {value!r}")
        if not (self.layer_map == "uniform" or isinstance(self.layer_map, dict)):
            raise KdscaleError(f"intermediate.layer_map: expected 'uniform' or a mapping "
                               f"{{student layer: teacher layer}}, got {self.layer_map!r}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in WEIGHTS)


def intermediate_config(loss: LossConfig) -> IntermediateConfig:
    return IntermediateConfig(hidden_mse=loss.hidden_mse, hidden_cosine=loss.hidden_cosine,
                              attention_kl=loss.attention_kl, layer_map=loss.layer_map)

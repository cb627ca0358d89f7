"""Bytes per device that a launch will need, estimated from parameter counts and shapes
(before anything is loaded), for `kdscale env`.

Training state per parameter (the ZeRO paper's accounting, Adam): 16-bit mixed precision
keeps 2 B of weights, 2 B of gradients and 12 B of fp32 master weights, momentum and
variance; fp32 training keeps 4 + 4 + 8. ZeRO-1 splits the optimizer state over the
processes, ZeRO-2 also the gradients, ZeRO-3 also the weights; offloading moves the
optimizer state (and with ZeRO-3 the weights) to CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class StudentMemory:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_state_bytes(params: int, mixed_precision: str, stage: int, world: int,
                         offload_optimizer: bool = False,
                         offload_params: bool = False) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) on one device."""
    half = mixed_precision in ("bf16", "fp16")
    weight_b, grad_b, optim_b = (2, 2, 12) if half else (4, 4, 8)
    weights = params * weight_b / (world if stage >= 3 else 1)
    grads = params * grad_b / (world if stage >= 2 else 1)
    optim = params * optim_b / (world if stage >= 1 else 1)
    if offload_optimizer:
        optim = 0.0
    if offload_params and stage >= 3:
        weights = 0.0
    return weights, grads, optim


def activation_bytes(batch: int, seq: int, hidden: int, heads: int, layers: int,
                     mixed_precision: str) -> float:
    """Activations a transformer encoder keeps for backward: per layer about
    s*b*h*(34 + 5*a*s/h) bytes in 16-bit (Korthikanti et al., 2022, no recomputation);
    fp32 keeps twice that."""
    per_layer = seq * batch * hidden * (34 + 5 * heads * seq / hidden)
    scale = 1 if mixed_precision in ("bf16", "fp16") else 2
    return layers * per_layer * scale


def teacher_weight_bytes(params: int, dtype: str, placement: str, world: int) -> float:
    """The teacher's weights on one device: a replica, a ZeRO-3 shard, or none (offloaded)."""
    full = params * DTYPE_BYTES[dtype]
    if placement == "replicate":
        return full
    if placement == "zero3":
        return full / world
    return 0.0

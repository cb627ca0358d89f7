"""The ZeRO settings that decide memory, read from a DeepSpeed JSON as DeepSpeed reads them:
a key left out takes DeepSpeed's default, and `"auto"` takes the value Accelerate fills from
the model's hidden size h when it prepares it (reduce bucket h^2, prefetch bucket 0.9 h^2,
persistence threshold 10 h)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), in elements of a tensor.
DEFAULT_REDUCE_BUCKET = 500_000_000
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_MAX_LIVE = 1_000_000_000
DEFAULT_REUSE_DISTANCE = 1_000_000_000
DEFAULT_PERSISTENCE = 100_000


@dataclass(frozen=True)
class ZeroSettings:
    stage: int = 0  # 0: no DeepSpeed
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = DEFAULT_REDUCE_BUCKET  # gradients gathered before each reduction
    overlap_comm: bool = False  # a second reduce bucket, so reduction overlaps backward
    contiguous_gradients: bool = True  # gradients copied into the bucket as they come
    prefetch_bucket: int = DEFAULT_PREFETCH_BUCKET  # ZeRO-3: parameters fetched ahead
    max_live_parameters: int = DEFAULT_MAX_LIVE  # ZeRO-3: gathered parameters kept at most
    max_reuse_distance: int = DEFAULT_REUSE_DISTANCE  # ZeRO-3: kept if reused this soon
    persistence_threshold: int = DEFAULT_PERSISTENCE  # ZeRO-3: smaller tensors stay whole


def zero_settings(deepspeed_file: str | Path | None, hidden_size: int) -> ZeroSettings:
    """The student's (or fine-tuned teacher's) ZeRO settings; no file: no DeepSpeed."""
    if deepspeed_file is None:
        return ZeroSettings()
    return settings_from_dict(json.loads(Path(deepspeed_file).read_text()), hidden_size)


def settings_from_dict(config: dict, hidden_size: int) -> ZeroSettings:
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    auto = {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}

    def number(key: str, default: int) -> int:
        value = zero.get(key, default)
        return int(auto[key] if value == "auto" else value)

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    # DeepSpeed overlaps communication by default under ZeRO-3 only.
    overlap = zero.get("overlap_comm")
    return ZeroSettings(
        stage=stage, offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param"),
        reduce_bucket=number("reduce_bucket_size", DEFAULT_REDUCE_BUCKET),
        overlap_comm=stage == 3 if overlap is None else bool(overlap),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket=number("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET),
        max_live_parameters=number("stage3_max_live_parameters", DEFAULT_MAX_LIVE),
        max_reuse_distance=number("stage3_max_reuse_distance", DEFAULT_REUSE_DISTANCE),
        persistence_threshold=number("stage3_param_persistence_threshold",
                                     DEFAULT_PERSISTENCE))

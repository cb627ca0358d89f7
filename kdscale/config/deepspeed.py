"""Typos in a DeepSpeed JSON stop the job at start, naming the key.

DeepSpeed itself checks its `zero_optimization` section strictly but ignores an unknown
top-level key, so `"gradient_cliping": 1.0` would silently train without clipping. A
top-level key that is not DeepSpeed's but is close to one of its keys is taken for a typo;
a key far from all of them is left alone (DeepSpeed grows sections faster than any list).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from kdscale.config.schema import ConfigError

_SECTIONS = {"zero_optimization", "optimizer", "scheduler", "bf16", "fp16", "amp",
             "activation_checkpointing", "flops_profiler", "tensorboard", "wandb",
             "csv_monitor", "comms_logger", "aio", "elasticity", "autotuning", "checkpoint",
             "data_efficiency", "compression_training", "zero_force_ds_cpu_optimizer"}


def known_top_level_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    return names | _SECTIONS


# Top-level sizes DeepSpeed would only reject at initialize (or never: a zero clipping norm).
_POSITIVE_INTS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps")


def read_deepspeed_config(path: str | Path, where: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file {path} does not exist (expected a DeepSpeed JSON)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: {path} must hold a JSON object of DeepSpeed settings, "
                          f"got {type(config).__name__}")
    return config


def check_deepspeed_config(config: dict | str | Path, where: str) -> None:
    if not isinstance(config, dict):
        config = read_deepspeed_config(config, where)
    known = known_top_level_keys()
    for key in config:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if key not in known and close:
            raise ConfigError(f"{where}: unknown DeepSpeed key {key!r} (did you mean "
                              f"{close[0]!r}?)")
    _check_values(config, where)
    _check_zero_section(config.get("zero_optimization", {}), where)


def _check_values(config: dict, where: str) -> None:
    for key in _POSITIVE_INTS:
        value = config.get(key, "auto")
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                                 and value > 0)
        if not ok:
            raise ConfigError(f"{where}: DeepSpeed key {key!r}: expected an integer > 0 or "
                              f"\"auto\", got {value!r}")
    clipping = config.get("gradient_clipping", "auto")
    ok = clipping == "auto" or (isinstance(clipping, (int, float))
                                and not isinstance(clipping, bool) and clipping >= 0)
    if not ok:
        raise ConfigError(f"{where}: DeepSpeed key 'gradient_clipping': expected a number >= 0 "
                          f"or \"auto\", got {clipping!r}")
    if not isinstance(config.get("zero_optimization", {}), dict):
        raise ConfigError(f"{where}: DeepSpeed key 'zero_optimization': expected an object "
                          f"such as {{\"stage\": 2}}, got {config['zero_optimization']!r}")


def _check_zero_section(zero: dict, where: str) -> None:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    fields = set(DeepSpeedZeroConfig.model_fields)
    aliases = {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    for key in zero:
        if key not in fields | aliases and not _deprecated(key):
            close = difflib.get_close_matches(key, sorted(fields | aliases), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown DeepSpeed key 'zero_optimization.{key}'"
                              f"{hint}")
    try:
        DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    except ValidationError as err:
        raise ConfigError(f"{where}: zero_optimization: {err.errors()[0]['msg']} "
                          f"({'.'.join(map(str, err.errors()[0]['loc']))})") from None


def _deprecated(key: str) -> bool:
    # Older spellings DeepSpeed still accepts and maps onto current fields.
    return key in {"cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory"}

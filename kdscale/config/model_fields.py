"""The config's grammar for models, checked before any model loads: `student.layers` and an
inline `teacher.config`."""

from __future__ import annotations

import difflib
import re

from kdscale.config.schema import ConfigError


def check_layer_spec(spec: list[int] | str) -> None:
    """The form of `student.layers`, checkable before the teacher is known."""
    if isinstance(spec, str) and not re.fullmatch(r"all|every_other|(first|uniform):\d+", spec):
        raise ConfigError(
            f"student.layers: expected a list of layer indices, 'first:K', 'uniform:K', "
            f"'every_other' or 'all', got {spec!r}")


def resolve_layers(spec: list[int] | str, num_teacher_layers: int) -> list[int]:
    """Turn `student.layers` into explicit teacher layer indices, checked against the teacher."""
    check_layer_spec(spec)
    n = num_teacher_layers
    if isinstance(spec, list):
        layers = list(spec)
    elif spec in ("all", "every_other"):
        layers = list(range(0, n, 1 if spec == "all" else 2))
    else:
        kind, k = spec.split(":")
        k = int(k)
        if not 0 < k <= n:
            raise ConfigError(f"student.layers: {spec!r} asks for {k} layers; the teacher has {n}")
        layers = list(range(k)) if kind == "first" else _evenly_spaced(k, n)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers:
        raise ConfigError(f"student.layers: layer indices {bad or layers} are not in the "
                          f"teacher, which has layers 0..{n - 1}")
    if sorted(set(layers)) != layers:
        raise ConfigError(f"student.layers: expected increasing, distinct indices, got {layers}")
    return layers


def _evenly_spaced(k: int, n: int) -> list[int]:
    if k == 1:
        return [n - 1]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def teacher_config_from_dict(fields: dict, num_labels: int):
    """An inline `teacher.config`, every key checked: BertConfig stores unknown keys silently,
    so a typo like num_hiden_layers would give a 12-layer teacher without a word."""
    from transformers import BertConfig  # imported here: `kdscale --help` skips transformers

    known = set(BertConfig().to_dict())
    for key in fields:
        if key == "num_labels":
            raise ConfigError("teacher.config.num_labels: not a setting; the number of "
                              "classes comes from the data's label column")
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f" (did you mean teacher.config.{hint[0]}?)" if hint else ""
            raise ConfigError(f"unknown key teacher.config.{key}{suggestion}; expected a "
                              f"BertConfig field")
    config = BertConfig(**fields, num_labels=num_labels)
    _check_shape(config)
    return config


# BertConfig takes any value for these; a model built from a wrong one fails deep inside
# PyTorch, or asks for more memory than any machine has.
SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings", "type_vocab_size")


def _check_shape(config) -> None:
    for key in SIZE_KEYS:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"teacher.config.{key}: expected an integer > 0, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"teacher.config.hidden_size: expected a multiple of "
                          f"num_attention_heads ({config.num_attention_heads}), got "
                          f"{config.hidden_size}")
    gib = 4 * approximate_parameters(config) / 2**30  # fp32 weights alone
    total = _memory_gib()
    if gib > total:
        raise ConfigError(f"teacher.config: a model of this shape holds about {gib:,.0f} GiB of "
                          f"fp32 weights; this machine has {total:,.0f} GiB of memory. Expected "
                          f"BERT-family sizes (BERT-large: hidden_size 1024, 24 layers, 1.3 GiB)")


def approximate_parameters(config) -> int:
    """Embeddings and transformer blocks (attention, feed-forward, norms): within 1% of a
    BERT's count; enough to catch a shape no machine could hold."""
    h, layers = config.hidden_size, config.num_hidden_layers
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h
    block = 4 * h * h + 2 * h * config.intermediate_size + 9 * h + config.intermediate_size
    return embeddings + layers * block


def _memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30

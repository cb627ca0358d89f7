"""Typed experiment configs: dataclasses loaded from YAML, dotted command-line overrides,
validated before any work starts.

A config file mirrors `Config` below; every key is optional. Overrides on the command line
use the same dotted keys: `--loss.temperature 4 --student.layers [0,2]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdscale.errors import KdscaleError


class ConfigError(KdscaleError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class TeacherConfig:
    model: str | None = None  # hub name or local directory to fine-tune from
    config: dict | None = None  # inline BertConfig fields: a teacher built from scratch
    tokenizer: str | None = None  # hub name or directory; default: teacher.model
    checkpoint: str | None = None  # an already fine-tuned teacher; default <output_dir>/teacher
    # Where the teacher's weights live while it runs: a full copy per process, sharded by
    # DeepSpeed ZeRO-3 (optionally offloaded to CPU memory), or chosen from its size.
    placement: Literal["auto", "replicate", "zero3", "zero3_offload"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA if able
    deepspeed_config: str | None = None  # default: the built-in configs/deepspeed/teacher_*.json
    # Where a student's teacher outputs come from: the logit cache, or the teacher itself,
    # run beside the student (needed for the hidden-state and attention losses).
    source: Literal["cache", "online"] = "cache"


@dataclass
class StudentConfig:
    # Teacher layers copied into the student: a list of indices, "first:K" (the seed recipe
    # keeps the first 3), "every_other" (DistilBERT) or "uniform:K" (K evenly spaced).
    # None: "first:3" of the teacher, or every layer of student.model.
    layers: list[int] | str | None = None
    dropout: float | None = None  # the student's hidden and attention dropout; None: teacher's
    # A pretrained student (a saved model directory) instead of the teacher's layers, e.g. a
    # general-distilled small BERT; it must share the teacher's vocabulary.
    model: str | None = None

    @property
    def layer_spec(self) -> list[int] | str:
        if self.layers is not None:
            return self.layers
        return "all" if self.model else "first:3"


@dataclass
class DataConfig:
    dataset: str | None = None  # hub dataset name, e.g. "glue"; or use train_file/eval_file
    subset: str | None = None  # hub dataset config, e.g. "sst2"
    train_file: str | None = None  # local csv/tsv/json/jsonl/parquet
    eval_file: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "sentence"
    text_pair_column: str | None = None  # set for sentence-pair tasks (MNLI, QQP, ...)
    label_column: str = "label"
    rename_columns: dict | None = None  # {name in file: name above}, where files differ
    max_length: int = 128
    max_train_examples: int | None = None  # keep the first N rows (quick runs)
    max_eval_examples: int | None = None


@dataclass
class CacheConfig:
    dir: str | None = None  # default <output_dir>/cache
    # Several teachers: their caches (dense), averaged in probability space with these weights
    # (default: equal). `dir` is then only where `kdscale cache` writes.
    ensemble: list[str] | None = None
    ensemble_weights: list[float] | None = None
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage of the raw logits
    kind: Literal["dense", "topk"] = "dense"  # topk: the k largest logits per row (big heads)
    k: int = 64
    shard_rows: int = 8192  # rows per shard file: the unit of work, of resume and of reading
    batch_size: int = 64  # teacher forward batch while caching
    overwrite: bool = False  # replace a complete cache built from another teacher or data


@dataclass
class LossConfig:
    # A number, or a schedule over the run: {kind: linear | cosine, start: 4.0, end: 1.0}.
    temperature: float | dict = 2.0
    alpha: float | dict = 0.5  # weight of the soft (KL) term; 1 - alpha goes to hard-label CE
    # Losses beyond logits (need teacher.source: online), each with its weight:
    hidden_mse: float = 0.0  # TinyBERT: hidden states through a learned projection
    hidden_cosine: float = 0.0  # DistilBERT: cosine between hidden states (equal widths)
    attention_kl: float = 0.0  # TinyBERT/MiniLM: KL between attention distributions
    layer_map: dict | str = "uniform"  # {student layer: teacher layer}, or "uniform"


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32  # per device
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # stop early (quick runs); None trains all epochs
    log_every: int = 10
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None: none
    keep_checkpoints: int = 2  # the newest complete ones are kept
    eval_every: int | None = None  # optimizer steps between evaluations (best model kept)
    # Accelerate trackers ("tensorboard", "wandb", "mlflow", ...; "none"), in <output>/logs.
    report_to: list[str] | str = "tensorboard"
    # Per-phase step times (data, teacher, forward, loss, backward, optimizer); on a GPU
    # they synchronize the device at each phase boundary, so switch off for top speed.
    time_breakdown: bool = True

    @property
    def trackers(self) -> list[str]:
        return [self.report_to] if isinstance(self.report_to, str) else self.report_to


@dataclass
class EvalConfig:
    batch_size: int = 64
    latency_batches: int = 20  # timed batches per model, after warm-up


@dataclass
class Config:
    output_dir: str = "runs/kdscale"
    seed: int = 42
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5))
    distill: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-4))
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def teacher_dir(self) -> Path:
        return Path(self.teacher.checkpoint or Path(self.output_dir) / "teacher")

    @property
    def student_dir(self) -> Path:
        return Path(self.output_dir) / "student"

    @property
    def student_best_dir(self) -> Path:  # the best student of distill.eval_every's evaluations
        return Path(self.output_dir) / "student_best"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir or Path(self.output_dir) / "cache")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `--dotted.key value` overrides, then validated."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    for key, value in parse_overrides(overrides or []):
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, "
                          f"got {type(raw).__name__}")
    return raw


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["--loss.temperature", "4", "--student.layers=[0,2]"]` -> [("loss.temperature", 4), ...]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an override like --section.key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value")
        pairs.append((key, _parse_value(key, text)))
    return pairs


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override --{key}: {text!r} is not a valid value "
                          f"(numbers, strings, [lists] and null are)") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[leaf] = value


def config_from_dict(raw: dict) -> Config:
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def _build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """`base` (default: `cls()`) with the keys of `raw` replaced; a nested section starts
    from its parent's default, so `distill:` keeps distill's own defaults."""
    base = cls() if base is None else base
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"unknown key {prefix}{key}{suggestion}; expected one of {names}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.", getattr(base, key))
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return dataclasses.replace(base, **values)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Return `value` as type `kind`, or raise naming the key and the expected type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif kind is type(None):
        if value is None:
            return None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (str, bool, dict):
        if isinstance(value, kind):
            return value
    raise ConfigError(f"{key}: expected {_describe(kind)}, got {value!r}")


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if kind is type(None):
        return "null"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(kind, str(kind))


def validate(config: Config) -> None:
    """Impossible values stop here, before any model or data is touched."""
    _validate_loss(config)
    _validate_ensemble(config.cache)
    _check(not (config.cache.ensemble and config.teacher.source == "online"), "cache.ensemble",
           "null when teacher.source is online", config.cache.ensemble)
    for section in ("finetune", "distill"):
        _validate_train(getattr(config, section), section)
    for key in ("max_length", "max_train_examples", "max_eval_examples"):
        value = getattr(config.data, key)
        _check(value is None or value > 0, f"data.{key}", "an integer > 0", value)
    for key, value in (("cache.shard_rows", config.cache.shard_rows), ("cache.k", config.cache.k),
                       ("cache.batch_size", config.cache.batch_size),
                       ("eval.batch_size", config.eval.batch_size)):
        _check(value > 0, key, "an integer > 0", value)
    _check(not (config.teacher.model and config.teacher.config), "teacher",
           "either teacher.model or teacher.config, not both", "both")
    _check(not (config.data.dataset and config.data.train_file), "data",
           "either data.dataset or data.train_file, not both", "both")
    dropout = config.student.dropout
    _check(dropout is None or 0 <= dropout < 1, "student.dropout", "a number in [0, 1) or null",
           dropout)
    _validate_models(config)


def _validate_models(config: Config) -> None:
    from kdscale.models import check_layer_spec, resolve_layers, teacher_config_from_dict

    check_layer_spec(config.student.layer_spec)
    if config.teacher.config is not None and config.student.model is None:
        teacher = teacher_config_from_dict(config.teacher.config, num_labels=2)
        resolve_layers(config.student.layer_spec, teacher.num_hidden_layers)


def _validate_loss(config: Config) -> None:
    from kdscale.errors import KdscaleError
    from kdscale.schedules import Schedule

    loss = config.loss
    for key, low, high, expected in (("temperature", 0.0, math.inf, "> 0"),
                                     ("alpha", 0.0, 1.0, "in [0, 1]")):
        try:
            lowest, highest = Schedule.from_value(getattr(loss, key)).bounds()
        except KdscaleError as err:
            raise ConfigError(f"loss.{key}: {err}") from None
        ok = (lowest > low if key == "temperature" else lowest >= low) and highest <= high
        value = getattr(loss, key)
        what = "a schedule staying" if isinstance(value, dict) else "a number"
        _check(ok, f"loss.{key}", f"{what} {expected}", value)
    for key in ("hidden_mse", "hidden_cosine", "attention_kl"):
        weight = getattr(loss, key)
        _check(weight >= 0, f"loss.{key}", "a weight >= 0", weight)
        _check(weight == 0 or config.teacher.source == "online", f"loss.{key}",
               "0 unless teacher.source is online (the cache holds logits only)", weight)


def _validate_ensemble(cache: CacheConfig) -> None:
    if cache.ensemble is None:
        _check(cache.ensemble_weights is None, "cache.ensemble_weights",
               "null unless cache.ensemble lists caches", cache.ensemble_weights)
        return
    _check(len(cache.ensemble) >= 1, "cache.ensemble", "a list of cache directories",
           cache.ensemble)
    weights = cache.ensemble_weights
    if weights is not None:
        _check(len(weights) == len(cache.ensemble), "cache.ensemble_weights",
               f"{len(cache.ensemble)} weights, one per cache", weights)
        _check(all(w > 0 for w in weights), "cache.ensemble_weights", "weights > 0", weights)


def _validate_train(train: TrainConfig, section: str) -> None:
    _check(train.epochs > 0, f"{section}.epochs", "a number > 0", train.epochs)
    _check(train.batch_size > 0, f"{section}.batch_size", "an integer > 0", train.batch_size)
    _check(train.learning_rate > 0, f"{section}.learning_rate", "a number > 0", train.learning_rate)
    _check(0 <= train.warmup_ratio < 1, f"{section}.warmup_ratio", "a number in [0, 1)",
           train.warmup_ratio)
    _check(train.gradient_accumulation_steps > 0, f"{section}.gradient_accumulation_steps",
           "an integer > 0", train.gradient_accumulation_steps)
    _check(train.max_steps is None or train.max_steps > 0, f"{section}.max_steps",
           "an integer > 0 or null", train.max_steps)
    _check(train.log_every > 0, f"{section}.log_every", "an integer > 0", train.log_every)
    _check(train.checkpoint_every is None or train.checkpoint_every > 0,
           f"{section}.checkpoint_every", "an integer > 0 or null", train.checkpoint_every)
    _check(train.keep_checkpoints > 0, f"{section}.keep_checkpoints", "an integer > 0",
           train.keep_checkpoints)
    _check(train.eval_every is None or train.eval_every > 0, f"{section}.eval_every",
           "an integer > 0 or null", train.eval_every)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)

"""Checks of a whole config: impossible values stop the job before any model or data is
touched, each naming its key and what was expected."""

from __future__ import annotations

import math
from typing import Any

from kdscale.config.model_fields import check_layer_spec, resolve_layers, teacher_config_from_dict
from kdscale.config.schedules import Schedule
from kdscale.config.schema import CacheConfig, Config, ConfigError, TrainConfig
from kdscale.errors import KdscaleError


def check_config(config: Config) -> None:
    """Impossible values stop here, before any model or data is touched."""
    _validate_loss(config)
    _validate_augment(config)
    _validate_unlabelled(config)
    _validate_ensemble(config.cache)
    _validate_tail(config)
    _check(not (config.cache.dtype == "int8" and config.cache.kind == "dense"), "cache.dtype",
           "float16, bfloat16 or float32 with cache.kind dense (int8 codes are for top-k and "
           "sampled rows)", config.cache.dtype)
    _check(not (config.cache.ensemble and config.teacher.source == "online"), "cache.ensemble",
           "null when teacher.source is online", config.cache.ensemble)
    for section in ("finetune", "distill"):
        _validate_train(getattr(config, section), section)
    for key in ("max_length", "max_train_examples", "max_eval_examples",
                "max_unlabelled_examples"):
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
    check_layer_spec(config.student.layer_spec)
    if config.teacher.config is not None and config.student.model is None:
        teacher = teacher_config_from_dict(config.teacher.config, num_labels=2)
        resolve_layers(config.student.layer_spec, teacher.num_hidden_layers)


def _validate_loss(config: Config) -> None:
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


def _validate_tail(config: Config) -> None:
    if config.cache.kind == "sampled":
        _check(not isinstance(config.loss.temperature, dict), "loss.temperature",
               "a number with cache.kind sampled (tokens are drawn at one temperature), not a "
               "schedule", config.loss.temperature)
        _check(not config.cache.tail, "cache.tail", "false with cache.kind sampled (the "
               "drawn tokens carry the whole distribution)", config.cache.tail)
    if not config.cache.tail:
        return
    _check(config.cache.kind == "topk", "cache.tail",
           "false for a dense cache (a dense row leaves no mass out)", config.cache.tail)
    _check(not isinstance(config.loss.temperature, dict), "loss.temperature",
           "a number with cache.tail (the tail is a mass at one temperature), not a schedule",
           config.loss.temperature)


def _validate_augment(config: Config) -> None:
    aug = config.data.augment
    _check(aug.copies >= 0, "data.augment.copies", "an integer >= 0", aug.copies)
    for key in ("mask_prob", "replace_prob", "ngram_prob"):
        _check(0 <= getattr(aug, key) <= 1, f"data.augment.{key}", "a probability in [0, 1]",
               getattr(aug, key))
    _check(aug.mask_prob + aug.replace_prob <= 1, "data.augment.replace_prob",
           f"at most 1 - mask_prob = {1 - aug.mask_prob:g}", aug.replace_prob)
    _check(aug.max_ngram >= 1, "data.augment.max_ngram", "an integer >= 1", aug.max_ngram)
    if not aug.copies:
        return
    _check(config.task == "classification", "data.augment.copies",
           f"0 for task {config.task} (copies are built for task classification)", aug.copies)
    # Copies have no label: with no soft term they would only dilute the hard one.
    _check(Schedule.from_value(config.loss.alpha).bounds()[1] > 0, "data.augment.copies",
           "0 when loss.alpha is 0 throughout (copies carry the soft term only)", aug.copies)


def _validate_unlabelled(config: Config) -> None:
    if config.data.unlabelled_file is None:
        return
    _check(config.task == "classification", "data.unlabelled_file",
           f"null for task {config.task} (unlabelled text is read by task classification)",
           config.data.unlabelled_file)
    # Unlabelled rows carry the soft term only: with none they would only dilute the hard one.
    _check(Schedule.from_value(config.loss.alpha).bounds()[1] > 0, "data.unlabelled_file",
           "null when loss.alpha is 0 throughout (unlabelled rows carry the soft term only)",
           config.data.unlabelled_file)


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
    # Evaluation during training keeps the best student; fine-tuning has no such step.
    _check(section != "finetune" or train.eval_every is None, f"{section}.eval_every",
           "null (evaluation during training is for distill)", train.eval_every)
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

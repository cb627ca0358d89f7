"""Distillation settings for a Hugging Face `Trainer` script, parsed by `HfArgumentParser`.

`DistillationArguments` sits next to a script's own dataclasses:

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments,
                               DistillationArguments))

`DistillationTrainingArguments` is `TrainingArguments` with the same `--kd_*` fields, so a script
that parses `TrainingArguments` swaps one name and keeps its unpacking line unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from kdscale.config import ConfigError, LossConfig, TeacherConfig
from kdscale.errors import print_errors_in_one_line
from kdscale.hf.inputs import check_cache_folder

INTERMEDIATE = ("kd_hidden_mse", "kd_hidden_cosine", "kd_attention_kl")
# flag: (its range, for a finite number; what the error says was expected)
NUMBERS = {
    "kd_temperature": (lambda t: t > 0, "a finite number > 0 (the softmax temperature T)"),
    "kd_alpha": (lambda a: 0 <= a <= 1, "a number in [0, 1] (the weight of the soft term; "
                                        "1 - alpha weighs the cross-entropy)"),
    **{name: (lambda w: w >= 0, "a finite number >= 0 (a loss weight)") for name in INTERMEDIATE},
}


@dataclass
class DistillationArguments:
    """The `--kd_*` settings of a Trainer script, parsed by `HfArgumentParser`.

    They sit beside the script's own dataclasses: the teacher's source (a cache or a live
    teacher), the loss (temperature, alpha, losses beyond logits) and where a live teacher
    runs. Each field's `help` says what it does; values are checked when parsed.

    Raises:
        ConfigError: two teacher sources, a value out of range, or a --kd_cache that is not a
            kdscale cache, naming the flag, the value and what was expected.
    """

    kd_cache: str | None = field(default=None, metadata={
        "help": "Teacher logits from a cache written by `kdscale cache` over the same training "
                "file (its example ids are the file's row numbers). Give this or --kd_teacher."})
    kd_cache_verify: bool = field(default=True, metadata={
        "help": "Before the first step, read every shard of --kd_cache once: sha256 against its "
                "manifest, and finite values (as `kdscale distill` does with cache.verify). "
                "false skips it."})
    kd_teacher: str | None = field(default=None, metadata={
        "help": "A fine-tuned teacher (a save_pretrained directory) run beside the student at "
                "every step; needed by the hidden-state and attention losses."})
    kd_teacher_placement: Literal["auto", "replicate", "zero3", "zero3_offload"] = field(
        default="auto", metadata={
            "help": "Where the live teacher's weights live: a copy per process, or sharded by "
                    "DeepSpeed ZeRO-3 on its own inference engine; auto picks from its size."})
    kd_teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = field(default="auto", metadata={
        "help": "The live teacher's dtype; auto: bf16 on CUDA where supported, else fp32."})
    kd_teacher_deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed JSON of a ZeRO-3 teacher; default: kdscale's teacher_zero3.json."})
    kd_temperature: float = field(default=2.0, metadata={
        "help": "T in alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE."})
    kd_alpha: float = field(default=0.5, metadata={
        "help": "Weight of the soft (KL) term; 1 - alpha weighs the cross-entropy on labels."})
    kd_hidden_mse: float = field(default=0.0, metadata={
        "help": "Weight of the hidden-state MSE (TinyBERT) on mapped layers; live teacher of "
                "the student's width."})
    kd_hidden_cosine: float = field(default=0.0, metadata={
        "help": "Weight of the hidden-state cosine loss (DistilBERT); live teacher only."})
    kd_attention_kl: float = field(default=0.0, metadata={
        "help": "Weight of the attention-distribution KL (TinyBERT/MiniLM); live teacher only."})
    kd_layer_map: str = field(default="uniform", metadata={
        "help": "Student layer -> teacher layer for the intermediate losses: 'uniform', or "
                "JSON such as '{\"0\": 1, \"1\": 3}'."})

    def __post_init__(self) -> None:
        print_errors_in_one_line()  # a bad flag ends the user's script with one line
        if self.kd_cache and self.kd_teacher:
            raise ConfigError(f"--kd_cache and --kd_teacher: give one teacher source, got the "
                               f"cache {self.kd_cache} and the teacher {self.kd_teacher}")
        self._check_numbers()
        self.layer_map()  # a malformed map fails at parse time, not at the first step
        if self.kd_cache:  # before the script spends minutes loading models
            check_cache_folder(self.kd_cache)

    def _check_numbers(self) -> None:
        for name, (in_range, expected) in NUMBERS.items():
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and in_range(value)):
                raise ConfigError(f"--{name}: expected {expected}, got {value!r}")

    def layer_map(self) -> dict | str:
        """`--kd_layer_map` parsed: "uniform", or the JSON object as parsed.

        Raises:
            ConfigError: neither "uniform" nor a non-empty JSON object.
        """
        if self.kd_layer_map == "uniform":
            return "uniform"
        try:
            mapping = json.loads(self.kd_layer_map)
        except json.JSONDecodeError:
            mapping = None
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError(f"--kd_layer_map: expected 'uniform' or a JSON object "
                               f"{{\"student layer\": teacher layer}}, got {self.kd_layer_map!r}")
        if not all(_is_layer_index(i) for pair in mapping.items() for i in pair):
            raise ConfigError(f"--kd_layer_map: expected layer indices (integers >= 0) on both "
                               f"sides, got {self.kd_layer_map!r}")
        return mapping

    @property
    def intermediate_enabled(self) -> bool:
        """Whether a loss beyond logits is on (it needs a live teacher)."""
        return any(getattr(self, name) > 0 for name in INTERMEDIATE)

    def loss_config(self) -> LossConfig:
        """These settings as the `loss` section of a kdscale config."""
        return LossConfig(temperature=self.kd_temperature, alpha=self.kd_alpha,
                          hidden_mse=self.kd_hidden_mse, hidden_cosine=self.kd_hidden_cosine,
                          attention_kl=self.kd_attention_kl, layer_map=self.layer_map())

    def teacher_config(self, checkpoint: str) -> TeacherConfig:
        """The `teacher` section of a kdscale config for a live teacher at `checkpoint`."""
        return TeacherConfig(checkpoint=checkpoint, placement=self.kd_teacher_placement,
                             precision=self.kd_teacher_precision,
                             deepspeed_config=self.kd_teacher_deepspeed)


def _is_layer_index(value: object) -> bool:
    """0, 1, ... or its string (a JSON key is always a string)."""
    if isinstance(value, str):
        return value.isascii() and value.strip().isdigit()
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class DistillationTrainingArguments(TrainingArguments, DistillationArguments):
    """`TrainingArguments` and `DistillationArguments` in one dataclass.

    A script that parses `TrainingArguments` swaps in this name and passes the result to
    `DistillationTrainer` as `args`; the `--kd_*` values are checked before any device setup.
    """

    def __post_init__(self) -> None:
        DistillationArguments.__post_init__(self)  # cheap checks before any device setup
        TrainingArguments.__post_init__(self)

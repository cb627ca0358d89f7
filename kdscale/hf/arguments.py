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

INTERMEDIATE = ("kd_hidden_mse", "kd_hidden_cosine", "kd_attention_kl")


@dataclass
class DistillationArguments:
    """The `--kd_*` settings of a Trainer script, parsed by `HfArgumentParser`.

    They sit beside the script's own dataclasses: the teacher's source (a cache or a live
    teacher), the loss (temperature, alpha, losses beyond logits) and where a live teacher
    runs. Each field's `help` says what it does; values are checked when parsed.

    Raises:
        ConfigError: two teacher sources, or a value out of range, naming the flag.
    """

    kd_cache: str | None = field(default=None, metadata={
        "help": "Teacher logits from a cache written by `kdscale cache` over the same training "
                "file (its example ids are the file's row numbers). Give this or --kd_teacher."})
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
        if self.kd_cache and self.kd_teacher:
            raise ConfigError(f"--kd_cache and --kd_teacher: give one teacher source, got the "
                               f"cache {self.kd_cache} and the teacher {self.kd_teacher}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ConfigError(f"--kd_temperature: expected a number > 0, got "
                               f"{self.kd_temperature}")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"--kd_alpha: expected a number in [0, 1], got {self.kd_alpha}")
        for name in INTERMEDIATE:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name}: expected a number >= 0, got {value}")
        self.layer_map()  # a malformed map fails at parse time, not at the first step

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


@dataclass
class DistillationTrainingArguments(TrainingArguments, DistillationArguments):
    """`TrainingArguments` and `DistillationArguments` in one dataclass.

    A script that parses `TrainingArguments` swaps in this name and passes the result to
    `DistillationTrainer` as `args`; the `--kd_*` values are checked before any device setup.
    """

    def __post_init__(self) -> None:
        DistillationArguments.__post_init__(self)  # cheap checks before any device setup
        TrainingArguments.__post_init__(self)

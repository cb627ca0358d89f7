"""Teacher and student sizes from their configs alone: the models are built on the meta
device, so no weights are read or allocated (a BERT-large count takes a second)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from kdscale.config import Config, ConfigError
from kdscale.config.model_fields import resolve_layers, teacher_config_from_dict
from kdscale.models import parameters_in_config
from kdscale.tasks import get_task

ASSUMED_LABELS = 2  # before fine-tuning the class count is the data's; the head is tiny


@dataclass
class ModelSizes:
    teacher_from: str  # which config the teacher's shape was read from
    teacher_params: int
    teacher_layers: int
    student_params: int
    student_layers: int
    student_hidden: int
    student_heads: int
    num_labels: int
    teacher_hidden: int
    teacher_heads: int
    # the teacher's: a masked LM's outputs (which set a cache's index width) and the word
    # embeddings, each model's largest tensor (vocab x hidden)
    vocab_size: int


def model_sizes(config: Config) -> ModelSizes:
    teacher, source = teacher_model_config(config)
    student = student_model_config(config, teacher)
    model_class = get_task(config.task).model_class  # the head differs by task
    return ModelSizes(source, parameters_in_config(teacher, model_class), teacher.num_hidden_layers,
                      parameters_in_config(student, model_class), student.num_hidden_layers,
                      student.hidden_size, student.num_attention_heads, teacher.num_labels,
                      teacher.hidden_size, teacher.num_attention_heads, teacher.vocab_size)


def teacher_model_config(config: Config) -> tuple[PretrainedConfig, str]:
    """The fine-tuned teacher's config when it exists, else the one fine-tuning starts from."""
    if (config.teacher_dir / "config.json").is_file():
        return _read(config.teacher_dir, "teacher.checkpoint"), str(config.teacher_dir)
    if config.teacher.config is not None:
        return teacher_config_from_dict(config.teacher.config, ASSUMED_LABELS), "teacher.config"
    if config.teacher.model is None:
        raise ConfigError("teacher: set teacher.model, teacher.config or teacher.checkpoint "
                          "(a fine-tuned teacher) to size the launch")
    model = _read(config.teacher.model, "teacher.model")
    model.num_labels = ASSUMED_LABELS
    return model, config.teacher.model


def student_model_config(config: Config, teacher: PretrainedConfig) -> PretrainedConfig:
    base = _read(config.student.model, "student.model") if config.student.model else teacher
    student = copy.deepcopy(base)
    student.num_hidden_layers = len(resolve_layers(config.student.layer_spec,
                                                   base.num_hidden_layers))
    student.num_labels = teacher.num_labels
    return student


def _read(name_or_dir: str | Path, key: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(name_or_dir))
    except OSError as err:
        raise ConfigError(f"{key}: cannot read the model config of {name_or_dir} ({err}); "
                          f"expected a local model directory or a reachable hub name") from None



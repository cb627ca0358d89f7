"""Students built from a teacher's own layers (the BERT recipe), and the checks that a
pretrained student can read the teacher's token ids."""

from __future__ import annotations

import copy
import re
from pathlib import Path

from transformers import (
    AutoConfig,
    PreTrainedModel,
)

from kdscale.config import ConfigError, StudentConfig
from kdscale.config.model_fields import resolve_layers
from kdscale.models.loading import (
    checkpoint_errors,
    load_tokenizer,
    num_layers_of,
    require_checkpoint,
)

# Transformer blocks in BERT-family state dicts: bert/roberta/electra use `encoder.layer.N.`,
# DistilBERT `transformer.layer.N.`.
_LAYER_KEY = re.compile(r"^(.*?(?:encoder|transformer)\.layer\.)(\d+)(\..*)$")


def student_from_teacher(teacher: PreTrainedModel, layers: list[int] | str,
                         dropout: float | None = None) -> PreTrainedModel:
    """A student of the teacher's class, made of a copy of the teacher's chosen layers.

    The embeddings and head are copied too, weight for weight; student layer i is teacher
    layer layers[i].

    Args:
        teacher: a BERT-family model (BERT, RoBERTa, ELECTRA, DistilBERT, ...).
        layers: teacher layer indices in increasing order, or "first:K", "uniform:K",
            "every_other", "all".
        dropout: the student's hidden and attention dropout; None keeps the teacher's.

    Returns:
        A new model; the teacher is not changed.

    Raises:
        ConfigError: a layer the teacher does not have, or indices out of order.
    """
    layers = resolve_layers(layers, teacher.config.num_hidden_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    student = type(teacher)(config)
    student_index = {t: s for s, t in enumerate(layers)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = tensor.clone()
        elif int(match[2]) in student_index:
            state[f"{match[1]}{student_index[int(match[2])]}{match[3]}"] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student


def build_student(cfg: StudentConfig, source: PreTrainedModel) -> PreTrainedModel:
    """The student of an experiment's `student` section, built from `source`.

    Args:
        cfg: the `student` section: its `layers`, `dropout` and `freeze_embeddings`.
        source: the teacher, or the pretrained `student.model` loaded with the teacher's head.

    Returns:
        A new model of the chosen layers of `source`; with `freeze_embeddings`, its token
        embeddings do not require grad.

    Raises:
        ConfigError: a layer `source` does not have, or indices out of order.
    """
    student = student_from_teacher(source, cfg.layer_spec, cfg.dropout)
    if cfg.freeze_embeddings:  # left out of the optimizer (and ZeRO's partitions)
        student.get_input_embeddings().requires_grad_(False)
    return student


def check_student_model(cfg: StudentConfig, teacher_dir: str | Path) -> None:
    """Check that a pretrained student (`student.model`) can read the teacher's token ids.

    It needs the teacher's vocabulary size and, where it ships a tokenizer, the same tokens.
    Checked from configs, before any weights load; without `student.model`, nothing to check.

    Args:
        cfg: the `student` section.
        teacher_dir: the fine-tuned teacher's directory.

    Raises:
        ConfigError: another vocabulary or tokenizer, or layers the student does not have.
        CheckpointError: `student.model` is not a loadable model directory.
    """
    if cfg.model is None:
        return
    require_checkpoint(Path(cfg.model), "student.model")
    with checkpoint_errors(f"student.model {cfg.model}"):
        student = AutoConfig.from_pretrained(cfg.model)
    teacher = AutoConfig.from_pretrained(str(teacher_dir))
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(f"student.model: {cfg.model} has a vocabulary of {student.vocab_size}"
                          f" tokens, the teacher {teacher.vocab_size}; the student reads the "
                          f"teacher's token ids, so the vocabularies must match")
    if any((Path(cfg.model) / name).is_file() for name in _TOKENIZER_FILES):
        theirs, ours = load_tokenizer(cfg.model, "student.model"), load_tokenizer(teacher_dir)
        if theirs.get_vocab() != ours.get_vocab():
            raise ConfigError(f"student.model: {cfg.model}'s tokenizer maps tokens to other ids "
                              f"than the teacher's ({teacher_dir}); expected the same vocabulary")
    resolve_layers(cfg.layer_spec, num_layers_of(cfg.model, "student.model"))


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

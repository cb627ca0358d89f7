"""Teachers and students: loading from a hub name, a local directory or an inline config, and
building a smaller student from a teacher's own layers (the BERT recipe)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PreTrainedModel,
)

from kdscale.config import ConfigError, StudentConfig, TeacherConfig
from kdscale.errors import KdscaleError
from kdscale.tasks import Task, get_task

# Transformer blocks in BERT-family state dicts: bert/roberta/electra use `encoder.layer.N.`,
# DistilBERT `transformer.layer.N.`.
_LAYER_KEY = re.compile(r"^(.*?(?:encoder|transformer)\.layer\.)(\d+)(\..*)$")
# RoBERTa-style models count positions from padding_idx + 1, so two of them are never used.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


class CheckpointError(KdscaleError, FileNotFoundError):
    """A model or tokenizer that cannot be loaded; the message names its directory or name.
    Also a FileNotFoundError, which a missing checkpoint has always raised."""


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


def teacher_config_from_dict(fields: dict, num_labels: int) -> BertConfig:
    """An inline `teacher.config`, every key checked: BertConfig stores unknown keys silently,
    so a typo like num_hiden_layers would give a 12-layer teacher without a word."""
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
    return BertConfig(**fields, num_labels=num_labels)


def load_teacher(cfg: TeacherConfig, labels: list[str] | int,
                 task: Task | None = None) -> PreTrainedModel:
    """A teacher to fine-tune: pretrained weights (hub name or local dir) or built from a
    config, with a new head for `labels` (names, or how many)."""
    if isinstance(labels, int):
        labels = [str(i) for i in range(labels)]
    return (task or get_task("classification")).new_model(cfg, labels)


def load_classifier(directory: str | Path, what: str = "model",
                    attn_implementation: str | None = None, task: Task | None = None
                    ) -> PreTrainedModel:
    """A fine-tuned model saved by kdscale (or any `save_pretrained` directory), of the
    task's class (default: a sequence classifier). Weights are read without running code:
    safetensors, or torch.load(weights_only=True) for a `.bin` file (transformers' default);
    code shipped in the directory runs only with trust_remote_code, which kdscale never
    passes."""
    _require_checkpoint(Path(directory), what)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model_class = task.model_class if task else AutoModelForSequenceClassification
    with _loading(f"{what} checkpoint {directory}"):
        return model_class.from_pretrained(directory, **options)


@contextlib.contextmanager
def _loading(what: str) -> Iterator[None]:
    """transformers reports a damaged, unsafe or absent checkpoint with whatever the failing
    layer raised (OSError, a safetensors or unpickling error, a size mismatch): one error,
    naming the checkpoint, instead."""
    try:
        yield
    except KdscaleError:
        raise
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} cannot be loaded: {cause}") from err


def _require_checkpoint(directory: Path, what: str) -> None:
    if not (directory / "config.json").is_file():
        hint = ("; run `kdscale finetune` first or set teacher.checkpoint"
                if what == "teacher" else "")
        raise CheckpointError(f"{what} checkpoint {directory} has no config.json (expected a "
                              f"directory written by save_pretrained){hint}")


def label_names(model: PreTrainedModel) -> list[str]:
    """Class names in label-id order, as fine-tuning stored them in the model's config."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


def load_tokenizer(name_or_dir: str | Path, what: str = "tokenizer"):
    with _loading(f"{what} {name_or_dir}"):
        return AutoTokenizer.from_pretrained(str(name_or_dir))


def check_inputs_fit(config, tokenizer, max_length: int, what: str) -> None:
    """The token ids and positions the data will feed a model must exist in it: an id past
    its embedding table or a position past its position embeddings fails deep inside a
    forward pass, or only on the first long example."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and config.model_type in _OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    if positions is not None and max_length > positions:
        raise ConfigError(f"data.max_length: expected at most {positions}, the positions "
                          f"{what} has (max_position_embeddings), got {max_length}")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {what} embeds only "
                          f"{vocab} (vocab_size); its ids would run past the embedding table. "
                          f"Expected the tokenizer the model was trained with")


def num_layers_of(checkpoint: str | Path, what: str = "teacher") -> int:
    """How many transformer layers a saved model has, read from its config alone (cheap)."""
    _require_checkpoint(Path(checkpoint), what)
    with _loading(f"{what} checkpoint {checkpoint}"):
        config = AutoConfig.from_pretrained(str(checkpoint))
    return getattr(config, "num_hidden_layers", None) or config.n_layers


def student_from_teacher(teacher: PreTrainedModel, layers: list[int] | str,
                         dropout: float | None = None) -> PreTrainedModel:
    """A student of the teacher's class with the teacher's embeddings, head and the chosen
    layers, copied weight for weight; student layer i is teacher layer layers[i]."""
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


def build_student(cfg: StudentConfig, teacher: PreTrainedModel,
                  task: Task | None = None) -> PreTrainedModel:
    """The student: the chosen layers of `student.model` (a pretrained checkpoint) or, by
    default, of the teacher, with the teacher's labels."""
    if cfg.model is None:
        student = student_from_teacher(teacher, cfg.layer_spec, cfg.dropout)
    else:
        task = task or get_task("classification")
        labels = task.label_names(teacher.config)
        with _loading(f"student.model {cfg.model}"):
            base = task.from_pretrained(cfg.model, labels or None)
        student = student_from_teacher(base, cfg.layer_spec, cfg.dropout)
    if cfg.freeze_embeddings:  # left out of the optimizer (and ZeRO's partitions)
        student.get_input_embeddings().requires_grad_(False)
    return student


def check_student_model(cfg: StudentConfig, teacher_dir: str | Path) -> None:
    """A pretrained student must read the teacher's token ids: the same vocabulary size, and
    the same tokens where it ships a tokenizer. Checked from configs, before any weights load."""
    if cfg.model is None:
        return
    _require_checkpoint(Path(cfg.model), "student.model")
    with _loading(f"student.model {cfg.model}"):
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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_sha256(model: torch.nn.Module) -> str:
    """Identity of a model's weights: names, shapes, dtypes and bytes of its state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_sha256(directory: str | Path) -> str:
    """Identity of a saved model's weights: its weight files' names and bytes, read in 8 MiB
    chunks (no process needs the whole model in memory, even a ZeRO-3 shard)."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise CheckpointError(f"checkpoint {directory} has no weight files "
                              f"(*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Identity of a tokenizer: its vocabulary and the settings that change token ids."""
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: normalizer, pre- and post-processing too
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings the tokenizer remembers; not identity.
        state.pop("truncation", None), state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(f"lower={getattr(tokenizer, 'do_lower_case', None)}".encode())
    return digest.hexdigest()

"""Loading saved models and tokenizers, with one error naming the checkpoint for whatever a
damaged, unsafe or absent one raises, and the checks that data fits a model."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from kdscale.config import ConfigError
from kdscale.errors import KdscaleError

# RoBERTa-style models count positions from padding_idx + 1, so two of them are never used.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


class CheckpointError(KdscaleError, FileNotFoundError):
    """A model or tokenizer that cannot be loaded; the message names its directory or name.
    Also a FileNotFoundError, which a missing checkpoint has always raised."""










def load_model(directory: str | Path, what: str = "model",
               attn_implementation: str | None = None,
               model_class: type = AutoModelForSequenceClassification) -> PreTrainedModel:
    """A fine-tuned model saved by kdscale (or any `save_pretrained` directory).

    Args:
        directory: the saved model's folder.
        what: how errors name it ("teacher", "student", ...).
        attn_implementation: passed to transformers (attention maps need "eager").
        model_class: the transformers Auto class of the task (`Task.model_class`).

    Returns:
        The model. Weights are read without running code: safetensors, or
        torch.load(weights_only=True) for a `.bin` file (transformers' default); code shipped
        in the directory runs only with trust_remote_code, which kdscale never passes.
    """
    require_checkpoint(Path(directory), what)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with checkpoint_errors(f"{what} checkpoint {directory}"):
        return model_class.from_pretrained(directory, **options)


@contextlib.contextmanager
def checkpoint_errors(what: str) -> Iterator[None]:
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


def require_checkpoint(directory: Path, what: str) -> None:
    if not (directory / "config.json").is_file():
        hint = ("; run `kdscale finetune` first or set teacher.checkpoint"
                if what == "teacher" else "")
        raise CheckpointError(f"{what} checkpoint {directory} has no config.json (expected a "
                              f"directory written by save_pretrained){hint}")


def label_names(model: PreTrainedModel) -> list[str]:
    """Class names in label-id order, as fine-tuning stored them in the model's config."""
    return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]


def load_tokenizer(name_or_dir: str | Path, what: str = "tokenizer"):
    with checkpoint_errors(f"{what} {name_or_dir}"):
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
    check_vocabulary(config, tokenizer, what)


def check_vocabulary(config, tokenizer, what: str) -> None:
    """The tokenizer is the one the model was trained with, as far as sizes tell: not far
    smaller than its embedding table (vocabulary files missing), and never larger."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) < vocab // 2:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {what} embeds "
                          f"{vocab} (vocab_size): it is not the tokenizer the model was trained "
                          f"with. Are its vocabulary files (tokenizer.json, vocab.txt) missing "
                          f"from the model's folder?")
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but {what} embeds only "
                          f"{vocab} (vocab_size); its ids would run past the embedding table. "
                          f"Expected the tokenizer the model was trained with")


def num_layers_of(checkpoint: str | Path, what: str = "teacher") -> int:
    """How many transformer layers a saved model has, read from its config alone (cheap)."""
    require_checkpoint(Path(checkpoint), what)
    with checkpoint_errors(f"{what} checkpoint {checkpoint}"):
        config = AutoConfig.from_pretrained(str(checkpoint))
    return getattr(config, "num_hidden_layers", None) or config.n_layers

















"""Identities of models and tokenizers (what a cache and a checkpoint record), and sizes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kdscale.models.loading import CheckpointError


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


def parameters_in_config(model_config, model_class) -> int:
    """Parameters of a model of this config and class, built on the meta device: no weights
    are read or allocated (a BERT-large count takes a second)."""
    with torch.device("meta"):
        model = model_class.from_config(model_config)
    return sum(p.numel() for p in model.parameters())

"""What a Trainer script hands kdscale, checked before any step: the `--kd_cache` folder, and the
tokenizer against the student and the training rows. Each refusal is one line naming the
argument or object, what it holds, and what was expected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from kdscale.cache.format import MANIFEST_NAME, SHARD_RE, CacheError, CacheManifest
from kdscale.config import ConfigError
from kdscale.data import SAMPLE_ROWS, check_rows_readable
from kdscale.errors import KdscaleError
from kdscale.models import check_vocabulary

EXPECTED_CACHE = "expected a folder written by `kdscale cache` (its manifest.json and shards)"


def check_cache_folder(path: str) -> None:
    """`--kd_cache` names a finished kdscale cache: a folder with a readable manifest. (The
    shards are opened, and verified, when the trainer starts.)

    Raises:
        ConfigError: naming the path, what is there instead, and what was expected.
    """
    problem = _folder_problem(Path(path))
    if problem:
        raise ConfigError(f"--kd_cache {path}: {problem}; {EXPECTED_CACHE}")


def _folder_problem(folder: Path) -> str | None:
    if not folder.exists():
        return "no such file or folder"
    if not folder.is_dir():
        return "is a file, not a folder"
    if (folder / MANIFEST_NAME).is_file():
        return _manifest_problem(folder / MANIFEST_NAME)
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "is an empty folder"
    if any(SHARD_RE.fullmatch(name) for name in names):
        # A cache job that stopped before its manifest: its rerun finishes it.
        return (f"holds shards but no {MANIFEST_NAME}: a `kdscale cache` run that did not "
                f"finish (rerun it to complete the cache)")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"holds no {MANIFEST_NAME} (it holds {shown})"


def _manifest_problem(path: Path) -> str | None:
    try:
        CacheManifest.from_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"its {MANIFEST_NAME} is not text (not a kdscale manifest)"
    except OSError as err:
        return f"its {MANIFEST_NAME} cannot be read ({err.strerror or err})"
    except CacheError as err:
        return f"its {MANIFEST_NAME} is not a kdscale manifest ({err})"
    return None


def check_tokenizer(tokenizer, model: PretrainedConfig, dataset) -> None:
    """The tokenizer given as `processing_class` can be the student's, and can read the data:
    as `kdscale distill` checks its own, a tokenizer far smaller than the student's embedding
    table (its vocabulary files missing) or one that leaves over half the tokens of the first
    rows unknown is refused. Nothing is checked without a tokenizer or `input_ids`.

    Raises:
        KdscaleError: naming the tokenizer and what it cannot do.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return
    try:
        check_vocabulary(model, tokenizer, "the student")
    except KdscaleError as err:
        raise KdscaleError(f"processing_class: {err}") from None
    rows = _first_token_rows(dataset)
    if rows:
        check_rows_readable(rows, tokenizer, "processing_class (the tokenizer)")


def _first_token_rows(dataset) -> list[Sequence[int]]:
    """The `input_ids` of the dataset's first rows; empty where it has none or cannot be
    indexed (an iterable dataset is not consumed for a check)."""
    if isinstance(dataset, datasets.Dataset):
        if "input_ids" not in dataset.column_names:
            return []
        return dataset.select(range(min(SAMPLE_ROWS, len(dataset))))["input_ids"]
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return []
    rows = [dataset[i] for i in range(min(SAMPLE_ROWS, len(dataset)))]
    return [[int(t) for t in row["input_ids"]] for row in rows   # lists or tensors
            if isinstance(row, Mapping) and "input_ids" in row]

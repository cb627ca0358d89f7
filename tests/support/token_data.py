"""Token-classification test data: the committed synthetic NER files, their generator, and
tiny hand-written splits (as jsonl, or parquet with ClassLabel tags like a hub dataset)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets

from kdscale.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]
NER_DATA = REPO / "examples" / "data" / "ner"
NER_CONFIG = REPO / "configs" / "ner_local.yaml"


def make_data_module():
    """examples/data/ner/make_data.py, imported by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ner_make_data", NER_DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_class_label_parquet(path: Path, rows: list[dict], names: list[str]) -> Path:
    """Tags stored as ids with a List(ClassLabel) feature, as conll2003 has them."""
    features = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ids = [[names.index(tag) for tag in row["ner_tags"]] for row in rows]
    table = {"tokens": [row["tokens"] for row in rows], "ner_tags": ids}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def ner_config(train: Path, dev: Path, max_length: int = 32) -> Config:
    return config_from_dict({
        "task": "token-classification",
        "data": {"train_file": str(train), "eval_file": str(dev), "text_column": "tokens",
                 "label_column": "ner_tags", "max_length": max_length}})

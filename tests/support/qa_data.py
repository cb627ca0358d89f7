"""Question-answering test data: SQuAD-format rows, experiment configs over the committed
synthetic task (examples/data/squad), and its word-level tokenizer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoTokenizer

from kdscale.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]
SQUAD = REPO / "examples" / "data" / "squad"

# Three people, 66 context tokens: 4 windows at max_length 32, doc_stride 8.
LONG_CONTEXT = ("Anna was born in Paris in 1987. Anna's favourite colour is red. Anna works as "
                "a teacher. Ben was born in Rome in 1990. Ben's favourite colour is blue. Ben "
                "works as a pilot. Clara was born in Oslo in 1961. Clara's favourite colour is "
                "green. Clara works as a nurse.")


def squad_tokenizer():
    return AutoTokenizer.from_pretrained(str(SQUAD / "tokenizer"))


def row(question: str, context: str, *answers: str, start: int | None = None) -> dict:
    """A SQuAD row; each answer starts at its first occurrence in the context (or `start`)."""
    starts = [context.find(a) if start is None else start for a in answers]
    return {"question": question, "context": context,
            "answers": {"text": list(answers), "answer_start": starts}}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(train: Path, eval_file: Path | None = None, **data) -> Config:
    fields = {"train_file": str(train), "eval_file": str(eval_file or train),
              "text_column": "question", "text_pair_column": "context",
              "label_column": "answers", "max_length": 32, "doc_stride": 8, **data}
    return config_from_dict({"task": "question-answering", "data": fields})


def experiment(root: Path, **sections) -> dict:
    """A tiny pipeline over the committed task: a 2-layer teacher of width 32 from scratch,
    a 1-layer student, a few steps of each."""
    tok = squad_tokenizer()
    steps = {"max_steps": 4, "batch_size": 16, "report_to": "none", "log_every": 1}
    raw = {"task": "question-answering", "output_dir": str(root / "run"), "seed": 0,
           "teacher": {"tokenizer": str(SQUAD / "tokenizer"), "placement": "replicate",
                       "config": {"vocab_size": len(tok), "hidden_size": 32,
                                  "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64, "max_position_embeddings": 64}},
           "student": {"layers": [1]},
           "data": {"train_file": str(SQUAD / "train.jsonl"),
                    "eval_file": str(SQUAD / "dev.jsonl"), "text_column": "question",
                    "text_pair_column": "context", "label_column": "answers",
                    "max_length": 64, "doc_stride": 32, "max_train_examples": 60,
                    "max_eval_examples": 20},
           "cache": {"dir": str(root / "cache"), "shard_rows": 32, "batch_size": 16},
           "finetune": {**steps, "learning_rate": 1e-3},
           "distill": {**steps, "learning_rate": 1e-3},
           "eval": {"batch_size": 16, "latency_batches": 1, "max_answer_length": 8}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def make_data_module():
    """examples/data/squad/make_data.py, imported from its file (it is a script)."""
    spec = importlib.util.spec_from_file_location("make_data", SQUAD / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

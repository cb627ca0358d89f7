"""Shared by the HF Trainer tests: a tiny task on disk (data files, a teacher and a student
saved with their tokenizer) and a real logit cache built from it by `kdscale cache`'s code."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    TrainingArguments,
)

from kdscale.commands.cache import run_cache
from kdscale.commands.demo import build_demo_tokenizer, write_demo_task
from kdscale.config import CacheConfig, Config, DataConfig, TeacherConfig
from kdscale.hf import DistillationArguments, DistillationTrainer
from tests.support.pipeline import REPO

N_TRAIN, N_EVAL, MAX_LENGTH = 64, 16, 64
EXAMPLE = REPO / "examples" / "hf_trainer"


@dataclass
class Task:
    root: Path
    train_file: Path
    eval_file: Path
    teacher: Path  # a save_pretrained directory with its tokenizer
    student: Path
    cache: Path  # a dense float32 cache of the teacher over train_file


def tiny_bert(layers: int, num_labels: int = 2, seed: int = 0,
              init_scale: float = 0.02) -> BertForSequenceClassification:
    """A seeded BERT classifier of width 32 without dropout (runs are deterministic). An
    `init_scale` of 0.5 gives logits that differ from example to example by a few units:
    a random teacher with opinions worth copying (at 0.02 every input gets the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=len(build_demo_tokenizer()), hidden_size=32, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=MAX_LENGTH,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            # label names as `kdscale finetune` stores them: the data's own values
            id2label={i: str(i) for i in range(num_labels)},
            label2id={str(i): i for i in range(num_labels)}, initializer_range=init_scale))
    return model.eval()


def save_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    build_demo_tokenizer().save_pretrained(directory)
    return directory


def build_cache(teacher: Path, train_file: Path, directory: Path, max_examples: int | None = None,
                kind: str = "dense") -> Path:
    """The teacher's logits over the file, written by the code behind `kdscale cache`."""
    config = Config(output_dir=str(directory.parent),
                    teacher=TeacherConfig(checkpoint=str(teacher), placement="replicate",
                                          precision="fp32"),
                    data=DataConfig(train_file=str(train_file), max_length=MAX_LENGTH,
                                    max_train_examples=max_examples),
                    cache=CacheConfig(dir=str(directory), dtype="float32", shard_rows=24,
                                      batch_size=16, kind=kind, k=1))
    run_cache(config)
    return directory


def make_task(root: Path) -> Task:
    files = write_demo_task(root / "data", N_TRAIN, N_EVAL, seed=0)
    teacher = save_model(tiny_bert(layers=4, seed=1, init_scale=0.5), root / "teacher")
    student = save_model(tiny_bert(layers=2, seed=2), root / "student")
    cache = build_cache(teacher, files["train"], root / "cache")
    return Task(root, files["train"], files["dev"], teacher, student, cache)


def script_args(task: Task, out: Path, *extra: str, batch_size: int = 16,
                steps: int = 4) -> list[str]:
    """Arguments of run_glue(_distill).py for a short deterministic run."""
    return ["--model_name_or_path", str(task.student), "--train_file", str(task.train_file),
            "--validation_file", str(task.eval_file), "--output_dir", str(out),
            "--max_seq_length", str(MAX_LENGTH), "--do_train", "--do_eval",
            "--per_device_train_batch_size", str(batch_size), "--max_steps", str(steps),
            "--learning_rate", "5e-4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra]


def train_logs(out: Path) -> list[dict]:
    """The training log lines (one per step) of a finished run."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def stock_script():
    """examples/hf_trainer/run_glue.py as a module: the tests read data as it does."""
    spec = importlib.util.spec_from_file_location("run_glue", EXAMPLE / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tokenized_train(task: Task, tokenizer) -> datasets.Dataset:
    """The training file as the stock script tokenizes it (labels 0 and 1 are their own ids)."""
    script = stock_script()
    data_args = script.DataArguments(train_file=str(task.train_file), max_seq_length=MAX_LENGTH)
    return script.tokenize(script.load_split(str(task.train_file)), tokenizer, data_args,
                           {0: 0, 1: 1})


def make_trainer(task: Task, tokenizer, out: Path, kd: dict, *, train=None, model=None,
                 teacher=None, **training) -> DistillationTrainer:
    """A DistillationTrainer over the task's training file, 4 short steps by default."""
    settings = {"per_device_train_batch_size": 16, "max_steps": 4, "learning_rate": 5e-4,
                "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                "disable_tqdm": True, "seed": 0, **training}
    return DistillationTrainer(
        model=model or AutoModelForSequenceClassification.from_pretrained(task.student),
        args=TrainingArguments(output_dir=str(out), **settings),
        kd_args=DistillationArguments(**kd), teacher=teacher,
        train_dataset=tokenized_train(task, tokenizer) if train is None else train,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)

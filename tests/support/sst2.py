"""Real SST-2 rows from ../shared/data, a tiny pretrained BERT whose WordPiece vocabulary is
learned from them (a stand-in with MiniLM's shape), and the SST-2 benchmark run at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import BertWordPieceTokenizer, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]


TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
TRAIN_ROWS, DEV_ROWS = 128, 48  # DEV_ROWS: the dev rows and the test rows scored alike
# Rows of the split's training file after the labelled ones, text only: bench.yaml's 48,000
# would have the teacher label, and the students train on, 48,000 rows in every toy run.
UNLABELLED_ROWS = 64


def tiny_pretrained_bert(directory: Path) -> Path:
    """A 6-layer BERT of width 32 with its tokenizer: a stand-in with MiniLM's shape."""
    sentences = [line.split("\t", 1)[1] for line in TRAIN.read_text().splitlines()[1:2001]]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(sentences, vocab_size=1500)
    # Trained from scratch, it has no [CLS] ... [SEP] template yet.
    wordpiece.post_processor = processors.BertProcessing(
        ("[SEP]", wordpiece.token_to_id("[SEP]")), ("[CLS]", wordpiece.token_to_id("[CLS]")))
    directory.mkdir(parents=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32,
                        num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    return directory


def bench_args(root: Path, out: str, *extra: str, seeds=("1", "2"),
               work: str = "work") -> list[str]:
    return ["--out", str(root / out), "--work", str(root / work), "--teacher_model",
            str(root / "pretrained"), "--max_train_examples", str(TRAIN_ROWS),
            "--max_eval_examples", str(DEV_ROWS), "--unlabelled_rows", str(UNLABELLED_ROWS),
            "--seeds", *seeds, "--latency_batches", "2", *extra]


def run_bench(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.sst2", *args], cwd=REPO, env=env,
                            capture_output=True, text=True,
                            timeout=900)  # a safety net on a busy machine, not a limit
    assert result.returncode == 0, result.stderr[-3000:]


def load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def all_models(report: dict):
    """Every model of a run: both sides' teachers and students, and the ablation's."""
    for side in ("kdscale", "baseline"):
        yield f"{side} teacher", report[side]["teacher"]
        for name, kinds in report[side]["students"].items():
            for kind, runs in kinds.items():
                for run in runs:
                    yield f"{side} {name} {kind} seed {run['seed']}", run
    for i, step in enumerate((report.get("ablation") or {}).get("steps", [])):
        yield f"ablation {i} teacher", step["teacher"]
        for name, run in step["students"].items():
            yield f"ablation {i} {name}", run


def check_scored_alike(report: dict, expected_models: int) -> None:
    """Every model scored on the run's dev rows and test rows, accuracies as counts of them."""
    models = dict(all_models(report))
    assert len(models) == expected_models
    assert report["dev"]["examples"] == report["test"]["examples"] == DEV_ROWS
    assert report["test"]["held_out"] == report["settings"]["test_split"]["rows"]
    for name, metrics in models.items():
        for split in (metrics, metrics["test"]):
            assert split["examples"] == DEV_ROWS, name
            right = split["accuracy"] * DEV_ROWS  # a count of the rows it got right
            assert right == pytest.approx(round(right)), name
        assert metrics["latency_ms"] > 0 and metrics["train_s"] > 0, name

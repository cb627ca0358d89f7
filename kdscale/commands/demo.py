"""The built-in demo task: movie-review sentiment generated from a small grammar, so the whole
pipeline runs offline with nothing downloaded.

The label needs more than a bag of words, so a transformer has something to learn: negation
flips a clause ("was not dull" is positive), and in "X, but Y" the clause after "but" decides.
A few labels are flipped at random, as in real annotated data.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kdscale import configs
from kdscale.config import Config, ConfigError, config_from_dict, read_yaml, to_dict
from kdscale.distributed import free_port

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the script",
            "the ending", "the cast", "the story", "this sequel", "the director", "the dialogue",
            "the pacing", "the camera work", "the lead", "the villain"]
VERBS = ["was", "is", "seemed", "felt", "looked", "turned out", "remained", "proved"]
NEGATIONS = ["not", "never", "hardly", "barely", "far from"]
INTENSIFIERS = ["", "", "very", "really", "quite", "truly", "so", "rather", "utterly", "fairly"]
POSITIVE = ["good", "great", "brilliant", "charming", "moving", "funny", "delightful", "superb",
            "clever", "wonderful", "gripping", "beautiful", "fresh", "touching", "stunning",
            "enjoyable", "witty", "solid", "memorable", "excellent"]
NEGATIVE = ["bad", "dull", "boring", "awful", "clumsy", "tedious", "weak", "messy", "bland",
            "painful", "silly", "forgettable", "lifeless", "terrible", "stale", "predictable",
            "annoying", "poor", "shallow", "flat"]
FILLERS = ["", "", "", "overall", "to be honest", "in my opinion", "from start to finish",
           "despite the hype", "for most of its running time", "if you ask me", "at times"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABEL_NOISE = 0.04


def _clause(rng: random.Random, polarity: int) -> str:
    """A clause whose meaning is `polarity` (1 positive, 0 negative)."""
    negated = rng.random() < 0.35
    adjective_is_positive = polarity ^ negated
    adjective = rng.choice(POSITIVE if adjective_is_positive else NEGATIVE)
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    words += [rng.choice(NEGATIONS)] if negated else []
    words += [rng.choice(INTENSIFIERS), adjective]
    return " ".join(w for w in words if w)


def make_example(rng: random.Random) -> dict:
    label = rng.randrange(2)
    if rng.random() < 0.4:  # "X, but Y": Y decides
        text = f"{_clause(rng, 1 - label)} , but {_clause(rng, label)}"
    elif rng.random() < 0.3:  # "X and Y": both agree
        text = f"{_clause(rng, label)} and {_clause(rng, label)}"
    else:
        text = _clause(rng, label)
    filler = rng.choice(FILLERS)
    text = f"{filler} , {text}" if filler else text
    if rng.random() < LABEL_NOISE:
        label = 1 - label
    return {"sentence": text + " .", "label": label}


def write_demo_task(directory: Path, n_train: int, n_eval: int, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and dev.jsonl; the same seed always gives the same files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {}
    for name, n in (("train", n_train), ("dev", n_eval)):
        files[name] = directory / f"{name}.jsonl"
        rows = [json.dumps(make_example(rng)) for _ in range(n)]
        files[name].write_text("\n".join(rows) + "\n")
    return files


def demo_vocabulary() -> list[str]:
    phrases = SUBJECTS + VERBS + NEGATIONS + INTENSIFIERS + POSITIVE + NEGATIVE + FILLERS
    words = sorted({w for phrase in phrases for w in phrase.split()} | {",", ".", "but", "and"})
    return SPECIAL_TOKENS + words


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(demo_vocabulary())


def word_level_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer of `vocabulary` (BERT's special tokens first)
    with BERT's [CLS] A [SEP] (B [SEP]) layout."""
    vocab = {token: i for i, token in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


DEMO_ROOT = "runs/demo"  # where configs/demo.yaml puts its files


def demo_config(output_dir: str = DEMO_ROOT, overrides: dict | None = None) -> Config:
    """configs/demo.yaml with its paths moved under `output_dir`, then `overrides`."""
    raw = read_yaml(configs.path("demo.yaml"))
    raw = _reroot(raw, DEMO_ROOT, str(output_dir))
    return config_from_dict(_merge(raw, overrides or {}))


def _reroot(raw, old: str, new: str):
    if isinstance(raw, dict):
        return {key: _reroot(value, old, new) for key, value in raw.items()}
    if isinstance(raw, str) and (raw == old or raw.startswith(old + "/")):
        return new + raw[len(old):]
    return raw


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def prepare_demo_files(config: Config, n_train: int = 6000, n_eval: int = 1000) -> None:
    """The data and tokenizer the demo config points at."""
    data_dir = Path(config.output_dir) / "data"
    write_demo_task(data_dir, n_train, n_eval, seed=config.seed)
    build_demo_tokenizer().save_pretrained(str(data_dir / "tokenizer"))


def run_demo(output_dir: str, overrides: list[str] | None = None,
             cache_processes: int = 2) -> dict:
    """Generate the task, fine-tune a teacher, cache its logits, distill, evaluate, report."""
    from kdscale.commands.distill import run_distill
    from kdscale.commands.evaluate import run_eval
    from kdscale.commands.finetune import run_finetune
    from kdscale.config import parse_overrides, set_dotted
    from kdscale.distributed import process_state
    from kdscale.files import check_writable

    if cache_processes < 1:
        raise ConfigError(f"--cache_processes must be 1 or more, got {cache_processes}")
    extra = {"cache": {"overwrite": True}}  # the demo owns its output directory
    for key, value in parse_overrides(overrides or []):
        set_dotted(extra, key, value)
    config = demo_config(output_dir, extra)
    check_writable(config.output_dir, "--output_dir")  # a file there, or a read-only folder
    state = process_state()
    if state.is_main_process:  # one writer for the shared files; the others wait for them
        prepare_demo_files(config)
    state.wait_for_everyone()
    run_finetune(config)
    run_cache_stage(config, state, cache_processes)
    run_distill(config)
    return run_eval(config)


def run_cache_stage(config: Config, state, processes: int) -> None:
    """The teacher's logits from several processes with the teacher sharded by ZeRO-3, the path
    a cluster takes. Launched here unless the demo itself already runs under a launcher, or
    one process was asked for (or there is one GPU)."""
    from kdscale.commands.cache import run_cache

    if torch.cuda.is_available():
        processes = min(processes, torch.cuda.device_count())
    if state.num_processes > 1 or processes == 1:
        return run_cache(config)
    config_file = Path(config.output_dir) / "config.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "kdscale", "cache", "--config", str(config_file)]
    print("launching:", " ".join(command[2:]), flush=True)
    threads = max(1, (os.cpu_count() or 2) // processes)  # share the cores, do not fight
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})

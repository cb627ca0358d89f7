"""Bad input to the Trainer path stops it before any step with one line naming the argument or
object, the value and what was expected: `--kd_*` numbers out of range, a `--kd_cache` that is
not a kdscale cache, a damaged cache (verified as `kdscale distill` verifies it), and a
tokenizer that cannot read the data. A user's script prints that line without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from kdscale.cache import LogitCache
from kdscale.cache.format import CacheError
from kdscale.commands.demo import demo_vocabulary, word_level_tokenizer
from kdscale.config import ConfigError
from kdscale.errors import KdscaleError
from kdscale.hf import DistillationArguments
from tests.support.bad_cases import flip_a_bit
from tests.support.bad_input import copy_tree, nan_logits
from tests.support.hf import EXAMPLE, make_task, make_trainer, script_args, tokenized_train
from tests.support.pipeline import LAUNCH_ENV, REPO

EXPECTED_CACHE = "expected a folder written by `kdscale cache` (its manifest.json and shards)"
ALPHA = "expected a number in [0, 1] (the weight of the soft term; 1 - alpha weighs the " \
        "cross-entropy)"
TEMPERATURE = "expected a finite number > 0 (the softmax temperature T)"
WEIGHT = "expected a finite number >= 0 (a loss weight)"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("hf_bad_task"))


@pytest.fixture(scope="module")
def tokenizer(task):
    return AutoTokenizer.from_pretrained(task.student)


# -- --kd_* numbers ----------------------------------------------------------------------------

NUMBERS = {  # the argument and its value -> the one line
    ("kd_alpha", 1.5): f"--kd_alpha: {ALPHA}, got 1.5",
    ("kd_alpha", -0.1): f"--kd_alpha: {ALPHA}, got -0.1",
    ("kd_alpha", float("nan")): f"--kd_alpha: {ALPHA}, got nan",
    ("kd_alpha", float("inf")): f"--kd_alpha: {ALPHA}, got inf",
    ("kd_alpha", "0.5"): f"--kd_alpha: {ALPHA}, got '0.5'",
    ("kd_temperature", 0.0): f"--kd_temperature: {TEMPERATURE}, got 0.0",
    ("kd_temperature", -2.0): f"--kd_temperature: {TEMPERATURE}, got -2.0",
    ("kd_temperature", float("nan")): f"--kd_temperature: {TEMPERATURE}, got nan",
    ("kd_temperature", float("inf")): f"--kd_temperature: {TEMPERATURE}, got inf",
    ("kd_hidden_mse", -1.0): f"--kd_hidden_mse: {WEIGHT}, got -1.0",
    ("kd_hidden_cosine", float("nan")): f"--kd_hidden_cosine: {WEIGHT}, got nan",
    ("kd_attention_kl", float("inf")): f"--kd_attention_kl: {WEIGHT}, got inf",
    ("kd_layer_map", '{"0": -1}'): "--kd_layer_map: expected layer indices (integers >= 0) on "
                                   "both sides, got '{\"0\": -1}'",
    ("kd_layer_map", '{"first": 1}'): "--kd_layer_map: expected layer indices (integers >= 0) "
                                      "on both sides, got '{\"first\": 1}'",
}


@pytest.mark.parametrize("name, value", list(NUMBERS), ids=[f"{n}={v}" for n, v in NUMBERS])
def test_a_number_out_of_range_is_refused_when_the_arguments_are_built(task, name, value):
    with pytest.raises(ConfigError) as raised:
        DistillationArguments(kd_cache=str(task.cache), **{name: value})
    assert str(raised.value) == NUMBERS[name, value]
    assert isinstance(raised.value, KdscaleError)


def test_numbers_in_range_are_taken(task):
    kd = DistillationArguments(kd_cache=str(task.cache), kd_alpha=1, kd_temperature=0.5,
                               kd_hidden_mse=0.0, kd_layer_map='{"0": 1, "1": 3}')
    assert (kd.kd_alpha, kd.kd_temperature, kd.layer_map()) == (1, 0.5, {"0": 1, "1": 3})
    assert DistillationArguments(kd_cache=str(task.cache), kd_alpha=0.0).kd_alpha == 0.0


# -- what the user's script prints -------------------------------------------------------------


def run_distill_script(task, out, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE / "run_glue_distill.py"),
                           *script_args(task, out, *flags)], cwd=REPO, env=LAUNCH_ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, line", [
    (["--kd_alpha", "1.5"], f"--kd_alpha: {ALPHA}, got 1.5"),
    (["--kd_temperature", "nan"], f"--kd_temperature: {TEMPERATURE}, got nan"),
    (["--kd_cache", "{data}"], "--kd_cache {data}: holds no manifest.json (it holds dev.jsonl, "
                               f"train.jsonl); {EXPECTED_CACHE}"),
], ids=["alpha 1.5", "temperature nan", "a data folder as the cache"])
def test_the_script_prints_one_line_and_no_traceback(task, tmp_path, flags, line):
    data = str(task.train_file.parent)
    flags = [f.format(data=data) for f in flags]
    source = [] if "--kd_cache" in flags else ["--kd_cache", str(task.cache)]
    result = run_distill_script(task, tmp_path, *source, *flags)
    assert result.returncode != 0
    assert f"kdscale: error: {line.format(data=data)}" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "trainer_state.json").exists()


# -- --kd_cache that is not a cache ------------------------------------------------------------


def _manifest(data: bytes):
    def make(path):
        path.mkdir()
        (path / "manifest.json").write_bytes(data)
    return make


NOT_CACHES = {  # a path made by make(path) -> what the line says is there
    "missing": (lambda path: None, "no such file or folder"),
    "a file": (lambda path: path.write_text("logits\n"), "is a file, not a folder"),
    "an empty folder": (lambda path: path.mkdir(), "is an empty folder"),
    "a folder of other files": (
        lambda path: (path.mkdir(), (path / "train.csv").write_text("a,b\n"),
                      (path / "notes.txt").write_text("x")),
        "holds no manifest.json (it holds notes.txt, train.csv)"),
    "a manifest of random bytes": (_manifest(b"\xff\xfe\x00\x9c" * 16),
                                   "its manifest.json is not text (not a kdscale manifest)"),
    "a manifest that is not JSON": (_manifest(b"{"), "its manifest.json is not a kdscale "
                                                     "manifest (manifest is not valid JSON"),
    "a JSON file of other fields": (_manifest(b'{"model_type": "bert"}'),
                                    "its manifest.json is not a kdscale manifest (manifest "
                                    "field"),
}


@pytest.mark.parametrize("name", list(NOT_CACHES))
def test_a_kd_cache_that_is_not_a_cache_is_named_with_what_was_expected(tmp_path, name):
    make, found = NOT_CACHES[name]
    path = tmp_path / "cache"
    make(path)
    with pytest.raises(ConfigError) as raised:
        DistillationArguments(kd_cache=str(path))
    message = str(raised.value)
    assert message.startswith(f"--kd_cache {path}: {found}")
    assert message.endswith(f"; {EXPECTED_CACHE}") and "\n" not in message


def test_shards_without_a_manifest_are_named_an_unfinished_cache(task, tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    shard = task.cache / "shard-00000.safetensors"
    (path / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ConfigError, match="holds shards but no manifest.json: a `kdscale cache` "
                                          "run that did not finish"):
        DistillationArguments(kd_cache=str(path))


# -- the cache verified before the first step --------------------------------------------------


def damaged_copy(task, tmp_path, damage):
    cache = copy_tree(task.cache, tmp_path / "cache")
    damage(cache)
    return cache


@pytest.mark.parametrize("damage, why", [
    (flip_a_bit, "shard-00001.safetensors: its bytes differ from the manifest's sha256"),
    (nan_logits, "shard-00000.safetensors: it holds NaN or infinite teacher values"),
], ids=["a flipped bit", "NaN logits, checksums consistent"])
def test_a_damaged_cache_is_refused_before_training_naming_the_shard(task, tokenizer, tmp_path,
                                                                     damage, why):
    cache = damaged_copy(task, tmp_path, damage)
    with pytest.raises(CacheError) as raised:
        make_trainer(task, tokenizer, tmp_path / "out", {"kd_cache": str(cache)})
    message = str(raised.value)
    assert f"cache {cache}: " in message and why in message
    assert "(or pass --kd_cache_verify false to skip this check)" in message
    assert not any((tmp_path / "out").rglob("*"))  # the Trainer made the folder; nothing in it


def test_a_whole_cache_is_verified_and_the_opt_out_skips_it(task, tokenizer, tmp_path, capsys):
    make_trainer(task, tokenizer, tmp_path / "whole", {"kd_cache": str(task.cache)})
    assert f"cache {task.cache} verified: 3 shards" in capsys.readouterr().out
    # Opted out, the flipped bit is not looked for: the trainer starts and serves the
    # changed value (the risk the flag takes).
    cache = damaged_copy(task, tmp_path, flip_a_bit)
    trainer = make_trainer(task, tokenizer, tmp_path / "out", {"kd_cache": str(cache),
                                                               "kd_cache_verify": False})
    assert f"cache {cache} verified:" not in capsys.readouterr().out
    ids = LogitCache(cache).example_ids()
    assert not LogitCache(cache).get(ids).equal(LogitCache(task.cache).get(ids))
    assert trainer.cache.directory == cache


def test_the_opt_out_parses_as_the_config_key_does():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DistillationArguments)
    (kd,) = parser.parse_args_into_dataclasses(["--kd_teacher", "t", "--kd_cache_verify", "false"])
    assert kd.kd_cache_verify is False
    (kd,) = parser.parse_args_into_dataclasses(["--kd_teacher", "t"])
    assert kd.kd_cache_verify is True


# -- a tokenizer that cannot read the data -----------------------------------------------------


def other_words_tokenizer():
    """As many tokens as the demo vocabulary, none of them the data's words."""
    specials = [t for t in demo_vocabulary() if t.startswith("[")]
    return word_level_tokenizer(specials + [f"zz{i}" for i in range(len(demo_vocabulary())
                                                                     - len(specials))])


def test_a_tokenizer_without_its_vocabulary_is_refused(task, tmp_path):
    specials_only = word_level_tokenizer([t for t in demo_vocabulary() if t.startswith("[")])
    with pytest.raises(KdscaleError, match=rf"^processing_class: the tokenizer has "
                                           rf"{len(specials_only)} tokens but the student embeds "
                                           rf"{len(demo_vocabulary())} \(vocab_size\)"):
        make_trainer(task, specials_only, tmp_path, {"kd_cache": str(task.cache)})


def test_a_tokenizer_of_other_words_is_refused(task, tmp_path):
    other = other_words_tokenizer()
    rows = tokenized_train(task, other)  # the script tokenized its data with it
    with pytest.raises(KdscaleError, match=r"^processing_class \(the tokenizer\): 100% of the "
                                           r"\d+ tokens in the first 64 rows are \[UNK\]"):
        make_trainer(task, other, tmp_path, {"kd_cache": str(task.cache)}, train=rows)


def test_a_tokenizer_larger_than_the_students_vocabulary_is_refused(task, tokenizer, tmp_path):
    small = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    with pytest.raises(KdscaleError, match=rf"^processing_class: the tokenizer has "
                                           rf"{len(tokenizer)} tokens but the student embeds only "
                                           r"50 \(vocab_size\)"):
        make_trainer(task, tokenizer, tmp_path, {"kd_cache": str(task.cache)}, model=small)


def test_rows_of_unknown_tokens_given_as_lists_are_read_too(task, tmp_path):
    """A torch Dataset of dicts (no `datasets` columns) is sampled by index."""
    other = other_words_tokenizer()
    rows = tokenized_train(task, other).to_list()

    class Rows:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {**rows[i], "example_id": i}

    with pytest.raises(KdscaleError, match=r"100% of the \d+ tokens in the first 64 rows"):
        make_trainer(task, other, tmp_path, {"kd_cache": str(task.cache)}, train=Rows())

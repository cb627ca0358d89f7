"""Configs: YAML <- dotted overrides, typed and validated; every bad key or value names itself."""

from pathlib import Path

import pytest

from kdscale.config import Config, ConfigError, load_config, parse_overrides

REPO = Path(__file__).parents[2]
TEACHER_4 = ("teacher:\n  config: {vocab_size: 100, hidden_size: 32, num_hidden_layers: 4,"
             " num_attention_heads: 2, intermediate_size: 64}\n")


@pytest.fixture
def write(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "experiment.yaml"
        path.write_text(text)
        return path
    return write


def test_yaml_values_set_and_defaults_filled(write):
    path = write("output_dir: runs/x\nloss:\n  temperature: 3\n"
                 "distill:\n  batch_size: 16\ndata:\n  train_file: train.tsv\n")
    config = load_config(path)
    assert config.output_dir == "runs/x"
    assert config.loss.temperature == 3.0 and isinstance(config.loss.temperature, float)
    assert config.loss.alpha == 0.5  # untouched key in a given section keeps its default
    assert config.distill.batch_size == 16 and config.finetune.batch_size == 32
    assert config.data.train_file == "train.tsv" and config.data.max_length == 128
    assert config.student.layer_spec == "first:3" and config.cache.dtype == "float16"
    assert config.finetune.learning_rate == 5e-5
    assert config.teacher_dir == Path("runs/x/teacher")
    assert config.cache_dir == Path("runs/x/cache")


def test_no_file_gives_all_defaults():
    config = load_config()
    assert config == Config()
    assert (config.finetune.learning_rate, config.distill.learning_rate) == (5e-5, 1e-4)


def test_partial_distill_section_keeps_distill_learning_rate(write):
    assert load_config(write("distill:\n  epochs: 2\n")).distill.learning_rate == 1e-4
    assert load_config(overrides=["--distill.epochs", "2"]).distill.learning_rate == 1e-4


def test_overrides_win_over_file(write):
    path = write("loss:\n  temperature: 2\n  alpha: 0.3\nstudent:\n  layers: first:3\n"
                 "data:\n  max_train_examples: 500\n")
    config = load_config(path, ["--loss.temperature", "4", "--student.layers=[0,2]",
                                "--data.max_train_examples", "10",
                                "--distill.learning_rate", "1e-5"])
    assert config.loss.temperature == 4.0
    assert config.loss.alpha == 0.3  # from the file, not overridden
    assert config.student.layers == [0, 2]
    assert config.data.max_train_examples == 10
    # YAML 1.1 reads "1e-5" (no dot) as a string; the float field still takes it.
    assert config.distill.learning_rate == pytest.approx(1e-5)
    assert isinstance(config.distill.learning_rate, float)


def test_parse_overrides_both_forms():
    assert parse_overrides(["--a.b", "4", "--c.d=[1, 2]", "--e=null"]) == [
        ("a.b", 4), ("c.d", [1, 2]), ("e", None)]


@pytest.mark.parametrize("args, fragment", [
    (["--loss.temperature"], "has no value"),
    (["loss.temperature", "4"], "expected an override like --section.key value"),
])
def test_bad_override_syntax(args, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_overrides(args)


def test_override_without_value_before_another_flag():
    with pytest.raises(ConfigError, match="has no value"):
        load_config(overrides=["--data.subset", "--seed=1"])


def test_malformed_override_value_is_a_config_error():
    with pytest.raises(ConfigError, match="student.layers"):
        load_config(overrides=["--student.layers", "[0,2"])


def test_mixed_precision_no_unquoted():
    config = load_config(overrides=["--distill.mixed_precision", "no"])
    assert config.distill.mixed_precision == "no"


@pytest.mark.parametrize("text, fragment", [
    ("loss:\n  temprature: 4\n",
     r"unknown key loss\.temprature \(did you mean loss\.temperature\?\)"),
    ("los:\n  temperature: 4\n", r"unknown key los \(did you mean loss\?\)"),
    ("optimizer:\n  lr: 1\n", r"unknown key optimizer;"),
    ("loss: 3\n", r"loss: expected a mapping"),
    ("loss:\n  alpha: high\n", r"loss\.alpha: expected a number or a mapping, got 'high'"),
    ("finetune:\n  batch_size: 2.5\n", r"finetune\.batch_size: expected an integer, got 2\.5"),
    ("distill:\n  epochs: true\n", r"distill\.epochs: expected a number, got True"),
    ("cache:\n  shard_rows: true\n", r"cache\.shard_rows: expected an integer, got True"),
    ("cache:\n  overwrite: 1\n", r"cache\.overwrite: expected true or false"),
    ("cache:\n  dtype: float64\n", r"cache\.dtype: expected one of"),
    ("cache:\n  kind: topk\n  dtype: int4\n",
     r"cache\.dtype: expected one of 'float16', 'bfloat16', 'float32', 'int8', got 'int4'"),
    ("cache:\n  dtype: int8\n",
     r"cache\.dtype: expected float16, bfloat16 or float32 with cache\.kind dense .*'int8'"),
    ("cache:\n  tail: true\n", r"cache\.tail: expected false for a dense cache"),
    ("cache:\n  kind: topk\n  tail: true\nloss:\n  temperature: {kind: linear, start: 4, end: 1}\n",
     r"loss\.temperature: expected a number with cache\.tail"),
    ("student:\n  layers: 3\n", r"student\.layers: expected a list of an integer or a string"),
    ("student:\n  layers: [0, true]\n", r"student\.layers"),
    ("loss:\n  alpha: -0.1\n", r"loss\.alpha: expected a number in \[0, 1\], got -0\.1"),
    ("loss:\n  alpha: 1.5\n", r"loss\.alpha: expected a number in \[0, 1\], got 1\.5"),
    ("loss:\n  temperature: 0\n", r"loss\.temperature: expected a number > 0, got 0\.0"),
    ("loss:\n  temperature: -1\n", r"loss\.temperature: expected a number > 0, got -1\.0"),
    ("finetune:\n  warmup_ratio: 1.0\n", r"finetune\.warmup_ratio"),
    ("distill:\n  max_steps: 0\n", r"distill\.max_steps"),
    ("data:\n  max_length: 0\n", r"data\.max_length"),
    ("teacher:\n  model: bert-base-uncased\n  config: {num_hidden_layers: 2}\n",
     r"either teacher\.model or teacher\.config, not both"),
    ("data:\n  dataset: glue\n  train_file: t.tsv\n", r"either data\.dataset or data\.train_file"),
    (TEACHER_4 + "student:\n  layers: [0, 7]\n", r"student\.layers: layer indices \[7\]"),
    (TEACHER_4 + "student:\n  layers: first:9\n", r"student\.layers: 'first:9' asks for 9 layers"),
    (TEACHER_4 + "student:\n  layers: [2, 1]\n", r"student\.layers: expected increasing"),
    (TEACHER_4 + "student:\n  layers: [1, 1]\n", r"student\.layers: expected increasing"),
    (TEACHER_4 + "student:\n  layers: last:2\n", r"student\.layers: expected a list"),
])
def test_bad_value_names_its_key(write, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(text))


def test_student_layers_checked_against_inline_teacher_pass(write):
    config = load_config(write(TEACHER_4 + "student:\n  layers: [0, 3]\n"))
    assert config.student.layers == [0, 3] and config.teacher.config["num_hidden_layers"] == 4


def test_misspelt_inline_teacher_key_is_rejected(write):
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        load_config(write("teacher:\n  config: {num_hiden_layers: 4}\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nowhere\.yaml does not exist"):
        load_config(tmp_path / "nowhere.yaml")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str")])
def test_yaml_not_a_mapping(write, text, kind):
    with pytest.raises(ConfigError, match=f"must hold a mapping of sections, got {kind}"):
        load_config(write(text))


def test_invalid_yaml(write):
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write("loss: [unclosed\n"))


def test_override_into_scalar_is_rejected(write):
    with pytest.raises(ConfigError, match="cannot set loss.temperature: loss is not a section"):
        load_config(write("loss: 3\n"), ["--loss.temperature", "4"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_repo_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_loss_schedules_and_online_only_losses():
    config = load_config(overrides=["--loss.temperature", "{kind: linear, start: 4, end: 1}"])
    assert config.loss.temperature == {"kind": "linear", "start": 4, "end": 1}
    with pytest.raises(ConfigError, match="loss.temperature: expected a schedule staying > 0"):
        load_config(overrides=["--loss.temperature", "{kind: linear, start: 4, end: 0}"])
    with pytest.raises(ConfigError, match=r"loss.alpha: expected a schedule staying in \[0, 1\]"):
        load_config(overrides=["--loss.alpha", "{kind: cosine, start: 0.2, end: 1.5}"])
    with pytest.raises(ConfigError, match="loss.hidden_mse: expected 0 unless teacher.source"):
        load_config(overrides=["--loss.hidden_mse", "1.0"])
    online = load_config(overrides=["--loss.hidden_mse", "1.0", "--teacher.source", "online"])
    assert online.loss.hidden_mse == 1.0


@pytest.mark.parametrize("make, fragment", [
    (lambda path: path.write_bytes(b"loss:\n  temperature: 2\n# caf\xe9\n"),
     "is not UTF-8 text (byte 28 is 0xe9); expected a YAML file"),
    (lambda path: path.mkdir(), "is a folder; expected a YAML file"),
    (lambda path: path.write_text("loss: [unclosed\n"), "is not valid YAML"),
    (lambda path: path.write_text("- a list\n"), "must hold a mapping of sections, got list"),
])
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, make, fragment):
    path = tmp_path / "experiment.yaml"
    make(path)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"config file {path} {fragment}")

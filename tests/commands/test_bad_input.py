"""Wrong inputs, one row each: configs, data, models, caches, checkpoints and launch settings.
Every row stops with a KdscaleError naming the problem, before anything already written (the
teacher, the cache, a run's student and checkpoints) changes by a byte. Over 300 lines on
purpose: one table of every case, so a reader sees the classes side by side (the setups are in
tests/support/bad_cases.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kdscale.errors import KdscaleError
from tests.support.bad_cases import (
    CLASSIFIER,
    HELD,
    TINY,
    Case,
    cache_being_built,
    cache_copy,
    checkpoint,
    damaged_teacher,
    data_file,
    data_path,
    deepspeed_file,
    finetune,
    flip_a_bit,
    fresh_run,
    launch_deepspeed,
    link_loop,
    negative_label,
    other_teacher,
    overrides,
    pretrained_student,
    sections,
    teacher_without_label_names,
    teacher_without_tokenizer,
    tokenizer_of_other_words,
    truncated_teacher,
)
from tests.support.bad_input import (
    changed,
    copy_tree,
    damaged_state,
    edit_launch,
    edit_manifest,
    nan_logits,
    resave_teacher,
    run_command,
    set_,
    snapshot,
    topk_cache,
    write_experiment,
)

CASES = {
    # configs
    "unknown key": Case("config", overrides("--loss.temprature", "2"),
                        "unknown key loss.temprature (did you mean loss.temperature?)"),
    "wrong type": Case("config", sections(distill={"batch_size": "eight"}),
                       "distill.batch_size: expected an integer, got 'eight'"),
    "value out of range": Case("config", sections(loss={"alpha": 1.5}),
                               "loss.alpha: expected a number in [0, 1], got 1.5"),
    "unknown inline model key": Case(
        "config", sections(teacher={"config": {"num_hiden_layers": 2}}),
        "unknown key teacher.config.num_hiden_layers"),
    "layer the teacher lacks": Case("distill", sections(student={"layers": [0, 5]}),
                                    "student.layers: layer indices [5] are not in the teacher"),
    # data
    "missing data file": Case("distill", sections(data={"train_file": "nowhere.jsonl"}),
                              "data.train_file: file nowhere.jsonl does not exist"),
    "unknown file type": Case("distill", data_file("train.xml", "<a/>\n"), "has extension '.xml'"),
    "missing column": Case("distill", sections(data={"text_column": "review"}),
                           "data.text_column: column 'review' is not in"),
    "empty dataset": Case("distill", data_file("train.jsonl", ""), "has no rows"),
    "header without rows": Case("distill", data_file("train.csv", "sentence,label\n"),
                                "has no rows"),
    "unparsable file": Case("distill", data_file("train.jsonl", '{"sentence": "a", "label": 1}\n{'),
                            "cannot be read as json"),
    "row without a label": Case("distill", data_file("train.csv", "sentence,label\nthe plot,1\n"
                                                     "the cast,\nthe movie,0\n"),
                                "1 row(s) of data file"),
    "row without text": Case("distill", data_file("train.jsonl", '{"sentence": "the plot", '
                                                  '"label": 1}\n{"sentence": null, "label": 0}\n'),
                             "rows with example ids [1] have no text in column 'sentence'"),
    "regression labels": Case("distill", data_file("train.jsonl", '{"sentence": "the plot", '
                                                   '"label": 0.5}\n'),
                              "has label 0.5; expected class ids"),
    "label out of range": Case("distill", data_file("train.jsonl", '{"sentence": "the plot", '
                                                    '"label": 2}\n'),
                               "train labels ['2'] are not among the training labels ['0', '1']"),
    "tab inside a quoted TSV field": Case("distill", data_file(
        "train.tsv", 'sentence\tlabel\n"a good\tfilm"\t1\nthe plot\t0\n'),
        "line(s) [2] of {tmp}/train.tsv (1 in all) do not have the header's 2 tab-separated"),
    "data file is a folder": Case("distill", data_path("train.tsv", lambda p: p.mkdir()),
                                  "{tmp}/train.tsv is a folder; expected a data file"),
    "data file is a loop of links": Case("distill", data_path("train.tsv", link_loop),
                                         "{tmp}/train.tsv is a loop of links"),
    "labels of mixed types": Case("distill", data_file(
        "train.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": "pos"}\n'),
        "mixes label types (1 and 'pos'); expected all class ids"),
    "corrupt parquet": Case("distill", data_path("train.parquet", lambda p: p.write_bytes(
        b"PAR1" + bytes(range(200)) + b"PAR1")), "{tmp}/train.parquet cannot be read as parquet"),
    "empty text": Case("distill", data_file("train.jsonl", '{"sentence": "the plot", "label": 1}'
                                            '\n{"sentence": " ", "label": 0}\n'),
                       "rows with example ids [1] have no text in column 'sentence'"),
    "text of no characters": Case("distill", data_file("train.jsonl", '{"sentence": "", "label": 0}'
                                                      '\n{"sentence": "the plot", "label": 1}\n'),
                                  "rows with example ids [0] have no text in column 'sentence'"),
    "finetune.eval_every": Case("config", sections(finetune={"eval_every": 5}),
                                "finetune.eval_every: expected null (evaluation during training"),
    "teacher hidden size 10^9": Case("config", sections(teacher={"config": TINY | {
        "hidden_size": 10**9, "num_attention_heads": 1}}),
        "teacher.config: a model of this shape holds about"),
    "teacher hidden size 130 with 12 heads": Case("config", sections(teacher={"config": TINY | {
        "hidden_size": 130, "num_attention_heads": 12}}),
        "teacher.config.hidden_size: expected a multiple of num_attention_heads (12), got 130"),
    "teacher negative layers": Case("config", sections(teacher={"config": TINY | {
        "num_hidden_layers": -2}}), "teacher.config.num_hidden_layers: expected an integer > 0"),
    "negative label": Case("finetune", negative_label, "labels must be >= 0, found -1"),
    "max_length beyond positions": Case("distill", sections(data={"max_length": 512}),
                                        "data.max_length: expected at most 32"),
    "max_length beyond positions (cache)": Case("cache", sections(data={"max_length": 64}),
                                                "data.max_length: expected at most 32"),
    # models
    "missing teacher": Case("distill", sections(teacher={"checkpoint": "nowhere"}),
                            "teacher checkpoint nowhere has no config.json"),
    "damaged teacher weights": Case("distill", damaged_teacher,
                                    "teacher checkpoint {tmp}/t cannot be loaded"),
    "missing tokenizer": Case("finetune", finetune(lambda p, tmp: {"tokenizer": "nowhere"}),
                              "teacher.tokenizer nowhere cannot be loaded"),
    "missing pretrained teacher": Case("finetune", finetune(lambda p, tmp: {
        "config": None, "model": str(tmp / "nowhere")}), "cannot be loaded"),
    "vocab mismatch": Case("finetune", finetune(lambda p, tmp: {"config": TINY}),
                           "the tokenizer has 114 tokens but the teacher embeds only 50"),
    "teacher without tokenizer files (eval)": Case(
        "eval", teacher_without_tokenizer(), "the tokenizer has 5 tokens but the teacher embeds "
        "114 (vocab_size): it is not the tokenizer the model was trained with"),
    "teacher without tokenizer files (cache)": Case(
        "cache", teacher_without_tokenizer({"cache": {"dir": "elsewhere"}}),
        "the tokenizer has 5 tokens but the teacher embeds 114"),
    "teacher without tokenizer files (distill)": Case(
        "distill", teacher_without_tokenizer(), "the tokenizer has 5 tokens"),
    "tokenizer of other words (finetune)": Case(
        "finetune", tokenizer_of_other_words,
        "100% of the 693 tokens in the first"),
    "teacher saved without id2label (cache)": Case(
        "cache", teacher_without_label_names({"cache": {"dir": "elsewhere"}}),
        "data.label_column: train labels ['0', '1'] are not the model's labels ['LABEL_0', "
        "'LABEL_1'], the names transformers gives a model saved without id2label. Set "
        "\"id2label\" in the model's config.json to the class each output was trained on (e.g. "
        "{{\"0\": \"0\", \"1\": \"1\"}} if output i learned the i-th sorted label"),
    "teacher saved without id2label (distill)": Case(
        "distill", teacher_without_label_names(),
        "are not the model's labels ['LABEL_0', 'LABEL_1'], the names transformers gives"),
    "teacher saved without id2label (eval)": Case(
        "eval", teacher_without_label_names(), "pass id2label= and label2id= to from_pretrained"),
    "teacher saved without id2label, labels named": Case(
        "cache", teacher_without_label_names({"cache": {"dir": "elsewhere"}, "data": lambda tmp: (
            (tmp / "named.jsonl").write_text('{"sentence": "a good plot", "label": "pos"}\n'
                                             '{"sentence": "a bad cast", "label": "neg"}\n'),
            {"train_file": str(tmp / "named.jsonl")})[1]}),
        "train labels ['neg', 'pos'] are not the model's labels ['LABEL_0', 'LABEL_1']"),
    "student of another vocab": Case("distill", pretrained_student,
                                     "has a vocabulary of 50 tokens, the teacher 114"),
    "student of NaN weights (eval)": Case("eval", lambda p, tmp: ({"output_dir": str(
        resave_teacher(p / "run" / "student", tmp / "nan" / "student", set_(
            "bert.encoder.layer.0.output.dense.weight", float("nan"))).parent)}, []),
        "the student ({tmp}/nan/student) holds weights that are not finite"),
    "eval before distill": Case("eval", sections(output_dir="elsewhere"),
                                "student checkpoint elsewhere/student has no config.json"),
    # caches
    "missing cache": Case("distill", sections(cache={"dir": "nowhere"}),
                          "cache directory nowhere does not exist"),
    "not a cache": Case("distill", lambda p, tmp: ({"cache": {"dir": str(p / "data")}}, []),
                        "is not a kdscale logit cache"),
    "cache of other data": Case("distill", sections(data={"max_train_examples": 40}),
                                "data_fingerprint: cache has"),
    "cache of another teacher": Case("distill", other_teacher(set_("classifier.bias", 0.5)),
                                     "teacher_sha256: cache has"),
    "cache format version 2": Case("distill", cache_copy(lambda c: edit_manifest(
        c, format_version=2)), "manifest field 'format_version': expected 1, got 2"),
    "manifest of random bytes": Case("distill", cache_copy(
        lambda c: (c / "manifest.json").write_bytes(b"\xff\xfe\x00\x9c" * 16)),
        "the manifest cannot be read as UTF-8 JSON"),
    "manifest not JSON": Case("distill", cache_copy(
        lambda c: (c / "manifest.json").write_text("{")), "manifest is not valid JSON"),
    "shard missing": Case("distill", cache_copy(
        lambda c: (c / "shard-00001.safetensors").unlink()), "is missing from"),
    "shard truncated": Case("distill", cache_copy(lambda c: (c / "shard-00001.safetensors")
                                                  .write_bytes(b"\0" * 8)),
                            "has 8 bytes, the manifest records"),
    "top-k cache for a classifier": Case("distill", topk_cache, "holds top-1 logits"),
    "cache being built by another job": Case(
        "cache", cache_being_built, "cache {tmp}/cache is being built by another `kdscale "
        "cache` (pid 4242 on node7 since 2026-12-05 04:00:00); wait for it to finish"),
    "k beyond the outputs": Case("cache", sections(cache={"kind": "topk", "k": 5,
                                                          "dir": "elsewhere"}),
                                 "cache.k: expected at most the teacher's 2 outputs, got 5"),
    "cache of other data, no overwrite": Case("cache", sections(data={"max_train_examples": 40}),
                                              "holds logits of other data; set --cache."
                                              "overwrite true to replace it (it is kept"),
    "damaged teacher, overwrite on": Case("cache", lambda p, tmp: (
        damaged_teacher(p, tmp)[0], ["--cache.overwrite", "true"]),
        "teacher checkpoint {tmp}/t cannot be loaded"),
    "damaged teacher, overwrite off": Case("cache", damaged_teacher,
                                           "teacher checkpoint {tmp}/t cannot be loaded"),
    "truncated teacher, overwrite on": Case("cache", truncated_teacher,
                                            "teacher checkpoint {tmp}/teacher cannot be loaded"),
    "NaN teacher, overwrite on": Case("cache", lambda p, tmp: (other_teacher(set_(
        CLASSIFIER, float("nan")))(p, tmp)[0], ["--cache.overwrite", "true"]),
        "teacher logits are not finite for example ids"),
    "NaN logits in a cache": Case("distill", lambda p, tmp: (cache_copy(nan_logits)(p, tmp)[0]
                                                             | {"distill": {"max_steps": 3}}, []),
                                  "shard-00000.safetensors: it holds NaN or infinite teacher "
                                  "values"),
    "NaN logits in a cache, not verified": Case("distill", lambda p, tmp: (cache_copy(
        nan_logits)(p, tmp)[0] | {"output_dir": str(tmp / "fresh")}, ["--cache.verify", "false"]),
        "holds NaN or inf teacher logits for example ids"),
    "one flipped bit in a shard": Case("distill", cache_copy(flip_a_bit),
                                       "1 damaged shard(s) (shard-00001.safetensors: its bytes "
                                       "differ from the manifest's sha256). `kdscale cache` with "
                                       "this config rewrites just those"),
    # training that is not finite: stopped before a checkpoint or a model is written
    "learning rate .inf": Case("config", overrides("--distill.learning_rate", ".inf"),
                               "distill.learning_rate: expected a finite number, got inf"),
    "weight decay -.inf": Case("config", sections(finetune={"weight_decay": float("-inf")}),
                               "finetune.weight_decay: expected a finite number, got -inf"),
    "epochs .inf": Case("config", sections(distill={"epochs": float("inf")}),
                        "distill.epochs: expected a finite number, got inf"),
    "diverging learning rate (distill)": Case(
        "distill", fresh_run(learning_rate=5e4, max_steps=6),
        "the weights diverged: expected a smaller distill.learning_rate (now 50000)"),
    # An update past float32's range: the weights overflow while the loss that drove it was
    # finite, on every CPU (5e4 above reaches either case first, depending on the CPU).
    "overflowing update (distill)": Case(
        "distill", fresh_run(learning_rate=1e39, max_steps=6),
        "(its loss was still finite); the weights diverged: expected a smaller "
        "distill.learning_rate (now 1e+39)"),
    "diverging learning rate (finetune)": Case(
        "finetune", lambda p, tmp: (finetune(lambda p, tmp: {})(p, tmp)[0] | {"finetune": {
            "learning_rate": 1e6, "max_steps": 8, "report_to": "none"}}, []),
        "expected a smaller finetune.learning_rate (now 1e+06)"),
    # launch settings and checkpoints
    "DeepSpeed bad value": Case("distill", launch_deepspeed(
        '{"train_micro_batch_size_per_gpu": 0}'),
        "DeepSpeed key 'train_micro_batch_size_per_gpu': expected an integer > 0"),
    "DeepSpeed typo": Case("distill", launch_deepspeed('{"gradient_cliping": 1.0}'),
                           "unknown DeepSpeed key 'gradient_cliping' (did you mean"),
    "DeepSpeed ZeRO stage 7": Case("cache", deepspeed_file('{"zero_optimization": {"stage": 7}}'),
                                   "zero_optimization: Input should be 0, 1, 2, 3"),
    "DeepSpeed not JSON": Case("cache", deepspeed_file('{"zero_optimization": '),
                               "is not valid JSON"),
    "DeepSpeed not an object": Case("cache", deepspeed_file("[1, 2]"),
                                    "must hold a JSON object of DeepSpeed settings, got list"),
    "DeepSpeed section not an object": Case("cache", deepspeed_file('{"zero_optimization": 3}'),
                                            "'zero_optimization': expected an object"),
    "world size change, other global batch": Case("distill", checkpoint(
        lambda run: edit_launch(run, 2, processes=2)),
        "global batch of 16 rows (2 process(es) x distill.batch_size 8); this run has 8 "
        "(1 x 8). The data order and every step depend on the global batch: "
        "distill.batch_size 16 resumes it on 1 process(es)"),
    "DeepSpeed checkpoint without DeepSpeed": Case("distill", checkpoint(
        lambda run: edit_launch(run, 2, processes=2, batch_size=4, deepspeed=True)),
        "holds DeepSpeed ZeRO state of 2 process(es); this run has 1 process(es) without"),
    "accumulation change on resume": Case("distill", checkpoint(
        lambda run: None, gradient_accumulation_steps=2),
        "distill.gradient_accumulation_steps: expected 1, as checkpoint"),
    "other trainable parameters on resume": Case("distill", lambda p, tmp: (
        {"student": {"freeze_embeddings": True}, "distill": {"max_steps": 3}}, []),
        "was written by a run with other settings (distill.max_steps, "
        "student.freeze_embeddings differ: distill.max_steps: 2 there, 3 now;"),
    "other learning rate on resume": Case("distill", sections(distill={"learning_rate": 1e-3}),
                                          "(distill.learning_rate differ: distill.learning_rate:"
                                          " 0.0001 there, 0.001 now)"),
    "other dropout on resume": Case("distill", sections(student={"dropout": 0.1}),
                                    "(student.dropout differ: student.dropout: 0.0 there, "
                                    "0.1 now)"),
    "other student layers on resume": Case("distill", sections(student={"layers": [1]}),
                                           "(student.layers differ: student.layers: [0] there, "
                                           "[1] now)"),
    "other temperature on resume": Case("distill", sections(loss={"temperature": 4.0}),
                                        "(loss.temperature differ"),
    "damaged checkpoint state": Case("distill", checkpoint(damaged_state),
                                     "trainer_state.json is missing or damaged"),
}
# Rows that fail while running (a cache's first batch): files may be added, none changed.
LATE = {"NaN logits in a cache, not verified", "diverging learning rate (distill)",
        "overflowing update (distill)",
        "NaN teacher, overwrite on", "diverging learning rate (finetune)"}

@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_and_nothing_written_changes(pipe, tmp_path, monkeypatch, name):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    copy_tree(pipe / "run", tmp_path / "run")
    extra, args, *env = case.setup(pipe, tmp_path)
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    extra.setdefault("output_dir", str(tmp_path / "run"))
    config = write_experiment(pipe, tmp_path / "experiment.yaml", **extra)
    before = snapshot(pipe, tmp_path)
    with pytest.raises(KdscaleError) as raised:
        run_command(case.command, config, args)
    for handle in HELD:
        handle.close()
    HELD.clear()
    assert case.fragment.format(tmp=tmp_path) in str(raised.value)
    after = snapshot(pipe, tmp_path)
    if name in LATE:
        after = {path: digest for path, digest in after.items() if path in before}
    assert changed(before, after) == []

def test_the_command_line_prints_the_error_without_a_traceback(pipe, tmp_path, capsys):
    from kdscale.cli import main

    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path / "o"),
                              data={"max_length": 512})
    assert main(["distill", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.max_length: expected at most 32" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()

def test_a_diverging_run_leaves_only_finite_checkpoints(pipe, tmp_path):
    """The learning rate typo of a user (5e4 for 5e-4): the job stops at the first step whose
    loss is not finite, and every checkpoint it wrote before holds finite weights."""
    out = tmp_path / "run"
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(out),
                              distill={"learning_rate": 5e4, "max_steps": 6})
    with pytest.raises(KdscaleError, match=r"not finite at step \d") as raised:
        run_command("distill", config)
    stopped_at = int(str(raised.value).split("at step ")[1].split()[0])
    written = sorted((out / "checkpoints" / "distill").glob("step-*"))
    assert [int(p.name.split("-")[1]) for p in written] == list(range(1, stopped_at))[-2:]
    for saved in written:
        weights = load_file(saved / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), saved
    assert not (out / "student").exists()


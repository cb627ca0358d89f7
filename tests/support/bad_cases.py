"""The wrong inputs of the bad-input suite, each a setup made from the tiny pipeline of
`tests.support.bad_input`: (pipeline root, scratch folder) -> (experiment sections, overrides)."""

from __future__ import annotations

from typing import NamedTuple

from tests.support.bad_input import (
    copy_tree,
    resave_teacher,
)

TINY = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16}


class Case(NamedTuple):
    command: str
    setup: object  # (pipeline root, scratch dir) -> (experiment sections, overrides)
    fragment: str


def data_file(name: str, text: str):
    def setup(p, tmp):
        (tmp / name).write_text(text)
        return {"data": {"train_file": str(tmp / name)}}, []
    return setup


def data_path(name: str, make):
    """data.train_file set to a path that `make(path)` turns into something else."""
    def setup(p, tmp):
        make(tmp / name)
        return {"data": {"train_file": str(tmp / name)}}, []
    return setup


def link_loop(path):
    path.symlink_to(path.with_name("other.tsv"))
    path.with_name("other.tsv").symlink_to(path)


def sections(**values):
    return lambda p, tmp: (values, [])


def overrides(*args):
    return lambda p, tmp: ({}, list(args))


def finetune(teacher):
    """A teacher fine-tuned from scratch with the demo tokenizer (a tiny config by default)."""
    def setup(p, tmp):
        base = {"config": TINY | {"vocab_size": 114}, "tokenizer": str(p / "teacher"),
                "checkpoint": str(tmp / "new_teacher")}
        return {"teacher": base | teacher(p, tmp), "finetune": {"report_to": "none"}}, []
    return setup


def cache_copy(change):
    def setup(p, tmp):
        change(copy_tree(p / "cache", tmp / "cache"))
        return {"cache": {"dir": str(tmp / "cache")}}, []
    return setup


def other_teacher(change, command_sections=None):
    def setup(p, tmp):
        teacher = resave_teacher(p / "teacher", tmp / "teacher", change)
        return {"teacher": {"checkpoint": str(teacher)}, **(command_sections or {})}, []
    return setup


def deepspeed_file(text: str):
    def setup(p, tmp):
        (tmp / "ds.json").write_text(text)
        return {"teacher": {"placement": "zero3", "deepspeed_config": str(tmp / "ds.json")}}, []
    return setup


def launch_deepspeed(text: str):
    def setup(p, tmp):
        (tmp / "ds.json").write_text(text)
        return {}, [], {"ACCELERATE_USE_DEEPSPEED": "true",
                        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp / "ds.json")}
    return setup


def checkpoint(change, **distill):
    def setup(p, tmp):
        change(tmp / "run")
        return {"distill": distill}, []
    return setup


def pretrained_student(p, tmp):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(**TINY)).save_pretrained(tmp / "small")
    return {"student": {"model": str(tmp / "small")}}, []


def negative_label(p, tmp):
    data, _ = data_file("train.jsonl", '{"sentence": "a", "label": -1}\n')(p, tmp)
    return finetune(lambda p, tmp: {})(p, tmp)[0] | data, []


def damaged_teacher(p, tmp):
    teacher = copy_tree(p / "teacher", tmp / "t")
    (teacher / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{")  # header cut short
    return {"teacher": {"checkpoint": str(teacher)}}, []


def truncated_teacher(p, tmp):
    """A copy of the teacher cut short mid-copy, with overwrite on: the cache must survive."""
    weights = copy_tree(p / "teacher", tmp / "teacher") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"teacher": {"checkpoint": str(tmp / "teacher")}}, ["--cache.overwrite", "true"]


def teacher_without_tokenizer(command_sections=None):
    """The teacher's folder as it is when its tokenizer files were never copied."""
    def setup(p, tmp):
        teacher = copy_tree(p / "teacher", tmp / "bare")
        for path in teacher.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "vocab")):
                path.unlink()
        return {"teacher": {"checkpoint": str(teacher)}, **(command_sections or {})}, []
    return setup


def teacher_without_label_names(command_sections=None):
    """The teacher as a Trainer script saves it when it sets num_labels alone: transformers
    names its outputs LABEL_0, LABEL_1 and leaves id2label out of config.json."""
    def unnamed(model):
        model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        model.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}

    def setup(p, tmp):
        teacher = resave_teacher(p / "teacher", tmp / "unnamed", unnamed)
        assert "id2label" not in (teacher / "config.json").read_text()
        sections = {key: value(tmp) if callable(value) else value
                    for key, value in (command_sections or {}).items()}
        return {"teacher": {"checkpoint": str(teacher)}, **sections}, []
    return setup


def tokenizer_of_other_words(p, tmp):
    """A tokenizer as large as the teacher's vocabulary whose words are not the data's."""
    from kdscale.commands.demo import demo_vocabulary, word_level_tokenizer

    specials = [t for t in demo_vocabulary() if t.startswith("[")]
    others = [f"zz{i}" for i in range(len(demo_vocabulary()) - len(specials))]
    word_level_tokenizer(specials + others).save_pretrained(tmp / "other_tokenizer")
    return finetune(lambda p, tmp: {"tokenizer": str(tmp / "other_tokenizer")})(p, tmp)


def flip_a_bit(cache):
    shard = cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # inside the last logits: the file still parses, with one value changed
    shard.write_bytes(bytes(data))


HELD = []  # open lock files, held for the test that took them


def cache_being_built(p, tmp):
    """Another `kdscale cache` holds the cache's lock (any open file description conflicts)."""
    import fcntl

    copy_tree(p / "cache", tmp / "cache")
    handle = open(tmp / ".cache.lock", "a+")  # noqa: SIM115 - held for the test
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("pid 4242 on node7 since 2026-12-05 04:00:00\n")
    handle.flush()
    HELD.append(handle)
    return {"cache": {"dir": str(tmp / "cache"), "overwrite": True}}, []


def fresh_run(**distill):
    """A new output folder holding a good student already (a run that trains from step 0)."""
    def setup(p, tmp):
        copy_tree(p / "run" / "student", tmp / "fresh" / "student")
        return {"output_dir": str(tmp / "fresh"), "distill": distill}, []
    return setup


CLASSIFIER = "classifier.weight"

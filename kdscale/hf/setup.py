"""What `DistillationTrainer` settles before training: the processes it runs in, the example ids
the cache is keyed by, and the teacher. Every check here runs at start and names what is wrong."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.integrations import deepspeed as hf_deepspeed

from kdscale.cache import LogitCache
from kdscale.config import Config
from kdscale.data.tokenize import tokenized_fingerprint
from kdscale.distributed import (
    launched_distributed,
    leave_process_group_at_exit,
    uses_deepspeed,
    warn_if_processes_lost,
)
from kdscale.errors import KdscaleError, print_errors_in_one_line
from kdscale.hf.arguments import DistillationArguments
from kdscale.models import count_parameters
from kdscale.teacher import TeacherRunner, load_runner

ID_COLUMN = "example_id"  # the cache's key: a row's position in the training file (data.py)
LABEL_COLUMNS = ("labels", "label", "label_ids")
_ID_HOWTO = (f"add an {ID_COLUMN!r} column holding each row's position in the training file, "
             f"the ids `kdscale cache` gives the rows it caches")


def settle_launch(args) -> None:
    """What the Trainer's Accelerator must find settled: this process's place among the
    launched ones (and the DeepSpeed values that depend on their number), a warning when the
    launch started fewer processes than asked, kdscale's errors printed as one line, and the
    processes leaving their group together when the script ends."""
    print_errors_in_one_line()
    join_cpu_processes(args)
    check_deepspeed_values(args)
    warn_if_processes_lost()
    leave_process_group_at_exit()


def join_cpu_processes(args) -> None:
    """Makes a launch of N CPU processes train as one group of N.

    Without CUDA, `TrainingArguments` builds Accelerate's state with no backend: DeepSpeed (or
    the launcher) has joined the N processes in one gloo group, but Accelerate counts 1, and
    each process would train alone on its own data order. The state is rebuilt with gloo, as
    `kdscale.distributed.process_state` builds it; Accelerate shares one state per process,
    so `args` sees the N processes too."""
    if torch.cuda.is_available() or not launched_distributed():
        return
    if not torch.distributed.is_initialized():
        return
    if PartialState().num_processes == torch.distributed.get_world_size():
        return  # already told (e.g. accelerator_config={"use_configured_state": True})
    AcceleratorState._reset_state(reset_partial_state=True)
    if getattr(args, "deepspeed", None) or uses_deepspeed():
        with _env("ACCELERATE_USE_DEEPSPEED", "true"):  # as TrainingArguments sets it
            PartialState(backend="gloo")
    else:
        PartialState(cpu=True, backend="gloo")
    resolve_deepspeed_config(args)


def resolve_deepspeed_config(args) -> None:
    """Fills the `--deepspeed` JSON's "auto" values again, for the processes now counted.

    `TrainingArguments` fills them when it is built, with the processes Accelerate counted
    then: one, before the CPU processes are joined. `"train_batch_size": "auto"` became one
    process's batch, and DeepSpeed would refuse it for N. Filled as transformers fills them
    (a fresh config from the user's file or dict), with its plugin."""
    if getattr(args, "hf_deepspeed_config", None) is None:
        return
    from accelerate.utils import DeepSpeedPlugin

    args.hf_deepspeed_config = hf_deepspeed.HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)


def check_deepspeed_values(args) -> None:
    """A `--deepspeed` value that is not "auto" and contradicts the training arguments (a
    batch size written for another number of processes) is refused before any step, naming
    both; transformers would stop on it at the first `train()` call, with a traceback."""
    config = getattr(args, "hf_deepspeed_config", None)
    mismatches = getattr(config, "mismatches", None)
    if not mismatches:
        return
    name = args.deepspeed if isinstance(args.deepspeed, str) else "(a dict)"
    found = "; ".join(m.removeprefix("- ") for m in mismatches)
    raise KdscaleError(f"--deepspeed {name}: values that contradict the training arguments "
                       f"({found}); expected \"auto\" (the arguments' value) or equal values")


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


# -- the cache and its example ids -------------------------------------------------------------


def with_example_ids(dataset):
    """The training set with the cache's key: its own `example_id` column, else its row
    positions, which are the training file's row numbers while its rows are in file order."""
    if isinstance(dataset, datasets.Dataset):
        if ID_COLUMN in dataset.column_names:
            return dataset
        # An indices mapping is what shuffle, filter, a split or a non-contiguous select leave.
        if dataset._indices is not None:
            raise KdscaleError(f"train_dataset has no {ID_COLUMN!r} column, and its rows were "
                               f"reordered or filtered (shuffle, filter, a split or select), so "
                               f"their positions are not the training file's row numbers; "
                               f"{_ID_HOWTO}")
        return dataset.add_column(ID_COLUMN, np.arange(len(dataset), dtype=np.int64))
    if ID_COLUMN in (_columns(dataset) or ()):
        return dataset
    raise KdscaleError(f"train_dataset ({type(dataset).__name__}) has no {ID_COLUMN!r} column, "
                       f"and kdscale numbers the rows of a `datasets.Dataset` only; {_ID_HOWTO}")


def _columns(dataset) -> list[str] | None:
    """A dataset's column names, or its first row's keys; None where neither can be read."""
    columns = getattr(dataset, "column_names", None)
    if columns is None and not isinstance(dataset, torch.utils.data.IterableDataset):
        try:
            first = dataset[0]
        except (TypeError, IndexError, KeyError):
            return None
        columns = list(first) if isinstance(first, Mapping) else None
    return columns


def check_cache(cache: LogitCache, dataset, num_labels: int) -> None:
    """The cache holds one dense row of `num_labels` logits for every training example."""
    m = cache.manifest
    if m.kind != "dense":
        raise KdscaleError(f"the logit cache at {cache.directory} holds top-{m.k} logits; "
                           f"DistillationTrainer distills sequence classifiers from dense "
                           f"caches (`kdscale cache` with cache.kind dense)")
    if m.num_outputs != num_labels:
        raise KdscaleError(f"the logit cache at {cache.directory} holds {m.num_outputs} logits "
                           f"per example, but the student has {num_labels} labels; was it "
                           f"built with another teacher or task?")
    if not isinstance(dataset, datasets.Dataset):
        return  # other datasets are read row by row; a missing id fails at its batch
    ids = np.asarray(dataset[ID_COLUMN], dtype=np.int64)
    missing = ids[~np.isin(ids, cache.example_ids().numpy())]
    if missing.size:
        raise KdscaleError(f"the logit cache at {cache.directory} does not cover the training "
                           f"set: {missing.size} of its {ids.size} example ids are not cached "
                           f"(first: {missing[0]}; the cache has {len(cache)} examples). Build "
                           f"it from the same training file, with no data.max_train_examples "
                           f"below the rows used here")
    check_same_data(cache, dataset)


def check_same_data(cache: LogitCache, dataset: datasets.Dataset) -> None:
    """The cache was built from these rows: its data fingerprint (ids, tokens, labels) is
    recomputed from the training set when it holds the cache's whole transfer set (a subset
    cannot be fingerprinted; its coverage is checked by id above)."""
    m = cache.manifest
    if m.max_length is None or len(dataset) != m.num_examples:
        return
    if tokenized_fingerprint(dataset, m.max_length) != m.data_fingerprint:
        raise KdscaleError(f"the logit cache at {cache.directory} was built from other data than "
                           f"train_dataset: the rows' tokens or labels differ (data fingerprint "
                           f"{m.data_fingerprint[:12]}..., recomputed with data.max_length "
                           f"{m.max_length}). Expected a cache built by `kdscale cache` from the "
                           f"same training file, tokenizer and max length (--max_seq_length "
                           f"{m.max_length})")


def check_labels(dataset, num_labels: int) -> None:
    """A classification student, and labels for the hard term."""
    if num_labels < 2:
        raise KdscaleError(f"the student has {num_labels} output (a regression head); "
                           f"distillation matches class distributions: num_labels >= 2")
    columns = _columns(dataset)
    if columns is not None and not any(c in columns for c in LABEL_COLUMNS):
        raise KdscaleError(f"train_dataset has no label column (one of {LABEL_COLUMNS}); "
                           f"its columns are {columns}. The distillation loss mixes in the "
                           f"cross-entropy on the labels")


# -- the live teacher ----------------------------------------------------------------------------


def check_teacher(teacher: PretrainedConfig, student: PretrainedConfig, where: str,
                  kd: DistillationArguments) -> None:
    """Teacher and student must agree on what the loss compares, before any weight is read."""
    if teacher.num_labels != student.num_labels:
        raise KdscaleError(f"the teacher {where} has {teacher.num_labels} labels and the "
                           f"student {student.num_labels}; the soft loss compares their "
                           f"logits label by label")
    if getattr(teacher, "vocab_size", None) != getattr(student, "vocab_size", None):
        raise KdscaleError(f"the teacher {where} has a vocabulary of {teacher.vocab_size} tokens "
                           f"and the student {student.vocab_size}; the teacher reads the "
                           f"student's input_ids, so both need one tokenizer")
    if kd.kd_hidden_mse > 0 and teacher.hidden_size != student.hidden_size:
        raise KdscaleError(f"--kd_hidden_mse: the teacher {where} has hidden size "
                           f"{teacher.hidden_size} and the student {student.hidden_size}; under "
                           f"the Trainer the hidden-state MSE compares equal widths (`kdscale "
                           f"distill` learns a projection between different ones)")


def teacher_config_of(teacher: str | PreTrainedModel) -> tuple[PretrainedConfig, str]:
    if isinstance(teacher, PreTrainedModel):
        return teacher.config, f"model {type(teacher).__name__}"
    if not (Path(teacher) / "config.json").is_file():
        raise KdscaleError(f"--kd_teacher: {teacher} has no config.json (expected a directory "
                           f"written by save_pretrained)")
    return AutoConfig.from_pretrained(str(teacher)), str(teacher)


def load_teacher(teacher: str | PreTrainedModel, kd: DistillationArguments, batch_size: int,
                 device: torch.device) -> TeacherRunner:
    """The teacher in its placement: a model object is replicated as given; a checkpoint
    directory is loaded by kdscale's runner (replicated, or ZeRO-3 on its own engine)."""
    attention = "eager" if kd.kd_attention_kl > 0 else None  # attention maps need eager
    if isinstance(teacher, PreTrainedModel):
        if any(hasattr(p, "ds_id") for p in teacher.parameters()):
            raise KdscaleError("the teacher model was loaded partitioned under the student's "
                               "ZeRO-3 config; pass its checkpoint directory instead, so it is "
                               "loaded in its own placement")
        if attention:
            teacher.set_attn_implementation(attention)
        return ModelTeacher(teacher, device)
    with _without_student_zero3():
        return load_runner(Config(teacher=kd.teacher_config(str(teacher))), PartialState(),
                           batch_size, attention)


@contextlib.contextmanager
def _without_student_zero3() -> Iterator[None]:
    """While the student's ZeRO-3 config is registered with transformers, from_pretrained
    partitions every model it loads: the teacher would come out sharded with no engine to
    gather it. The teacher loads outside it (a ZeRO-3 teacher under its own), then the
    student's registration is put back."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


class ModelTeacher(TeacherRunner):
    """A teacher model the script built itself, replicated on this process. Only the
    placement differs from a loaded runner, so the forward (`outputs`) is the runner's."""

    def __init__(self, model: PreTrainedModel, device: torch.device):  # no super(): no loading
        self.device, self.placement = device, "replicate"
        self.dtype = next(model.parameters()).dtype
        self.num_params = count_parameters(model)
        self.model = model.to(device).eval()

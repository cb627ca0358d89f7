"""`kdscale finetune`: fine-tune the teacher on the task with cross-entropy, step 1 of the
classic Hinton-style KD recipe."""

from __future__ import annotations

from pathlib import Path

import torch

from kdscale.commands.stage import begin_stage, start_accelerator, train_and_save
from kdscale.config import Config, ConfigError
from kdscale.config.model_fields import resolve_layers
from kdscale.data import check_unknown_rate, make_loader
from kdscale.data.batch import model_inputs
from kdscale.models import check_inputs_fit, load_tokenizer, num_layers_of
from kdscale.tasks import Task
from kdscale.train.timing import StepTimer


def cross_entropy_step(task: Task):
    """The task's cross-entropy over the batch's rows (classes, masked tokens, tags, span
    ends), as a sum: the training loop divides by the step's row count."""

    def step(model: torch.nn.Module, batch: dict, timer: StepTimer) -> dict[str, torch.Tensor]:
        with timer.phase("forward"), task.head_context(model, batch):
            outputs = model(**model_inputs(batch))
        with timer.phase("loss"):
            rows, labels = task.rows(task.label_logits(outputs, batch), batch)
            loss = torch.nn.functional.cross_entropy(rows.float(), labels, reduction="sum")
        return {"loss": loss}
    return step


def check_teacher_inputs(config: Config) -> None:
    """Settings that would only fail later (at distill time) are caught before fine-tuning."""
    source = config.teacher.tokenizer or config.teacher.model
    if source is None:
        raise ConfigError("teacher.tokenizer: expected a tokenizer name or directory when the "
                          "teacher is built from teacher.config")
    if config.teacher.model and Path(config.teacher.model).is_dir() and not config.student.model:
        resolve_layers(config.student.layer_spec,
                       num_layers_of(config.teacher.model, "teacher.model"))


def report_shards(accelerator, model: torch.nn.Module) -> None:
    """Under ZeRO-3, how much of the model this process holds, as loaded."""
    held = [p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor")]
    if held:
        total = sum(p.ds_numel for p in model.parameters())
        print(f"teacher loaded into ZeRO-3 shards: process {accelerator.process_index} holds "
              f"{sum(held):,} of {total:,} parameters", flush=True)


def run_finetune(config: Config) -> None:
    stage = begin_stage(config, "finetune")
    check_teacher_inputs(config)
    tokenizer = load_tokenizer(config.teacher.tokenizer or config.teacher.model,
                               "teacher.tokenizer" if config.teacher.tokenizer else "teacher.model")
    task = stage.task
    with stage.state.main_process_first():  # one tokenizes, the rest read its files
        train = task.load_split(config, tokenizer, "train")
    check_unknown_rate(train, tokenizer, f"the tokenizer of {tokenizer.name_or_path}")
    # Before the model: under ZeRO-3 each weight then loads straight into its shard, so no
    # process ever holds the whole teacher (nothing is copied out of it, unlike a student).
    accelerator = start_accelerator(stage)
    teacher = task.new_model(config.teacher, train.label_names)
    report_shards(accelerator, teacher)
    check_inputs_fit(teacher.config, tokenizer, config.data.max_length, "the teacher")
    if train.label_names:  # classes or tags; a masked LM's outputs are its vocabulary
        teacher.config.id2label = dict(enumerate(train.label_names))
        teacher.config.label2id = {name: i for i, name in enumerate(train.label_names)}
    global_batch = config.finetune.batch_size * accelerator.num_processes
    loader = make_loader(train, global_batch, task.collator(tokenizer), shuffle=True,
                         seed=config.seed)
    train_and_save(stage, accelerator, teacher, loader, cross_entropy_step(task), what="teacher",
                   tokenizer=tokenizer, save_to=config.teacher_dir,
                   data_fingerprint=train.fingerprint)

"""`kdscale distill`: train a student made of the teacher's layers on the cached teacher logits."""

from __future__ import annotations

from pathlib import Path

import torch

from kdscale.cache import LogitCache
from kdscale.cache.collator import TeacherLogitsCollator
from kdscale.config import Config
from kdscale.data import PaddingCollator, check_sources, make_loader, prepare
from kdscale.distributed import make_accelerator, process_state
from kdscale.losses import KDLoss
from kdscale.models import (
    checkpoint_sha256,
    label_names,
    load_classifier,
    load_tokenizer,
    num_layers_of,
    resolve_layers,
    student_from_teacher,
    tokenizer_sha256,
)
from kdscale.train import model_inputs, save_model, train_loop


def kd_step(loss: KDLoss):
    def step(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(**model_inputs(batch)).logits
        return loss.parts(logits, batch["teacher_logits"].float(), batch["labels"],
                          reduction="sum")
    return step


def run_distill(config: Config) -> None:
    # Everything that can be wrong with the inputs is checked before any model is built.
    check_sources(config.data)
    layers = resolve_layers(config.student.layers,
                            num_layers_of(config.teacher_dir))
    cache = LogitCache(config.cache_dir)
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_classifier(config.teacher_dir, "teacher")
    with process_state().main_process_first():  # one tokenizes, the rest read its files
        train = prepare(config.data, tokenizer, "train", label_names(teacher))
    cache.check_compatible(data_fingerprint=train.fingerprint,
                           teacher_sha256=checkpoint_sha256(config.teacher_dir),
                           tokenizer_sha256=tokenizer_sha256(tokenizer),
                           num_outputs=teacher.config.num_labels)
    student = student_from_teacher(teacher, layers, config.student.dropout)
    del teacher  # only its layers were needed; the cache stands in for its outputs
    # Built after the models: under a ZeRO-3 config, transformers would otherwise load the
    # teacher already partitioned, and its layers could not be copied.
    accelerator = make_accelerator(config.distill, config.seed)
    collate = TeacherLogitsCollator(PaddingCollator(tokenizer.pad_token_id), cache)
    global_batch = config.distill.batch_size * accelerator.num_processes
    loader = make_loader(train, global_batch, collate, shuffle=True, seed=config.seed)
    loss = KDLoss(config.loss.temperature, config.loss.alpha)
    accelerator.print(f"student: teacher layers {layers}, KDLoss({loss.extra_repr()})")
    student, history = train_loop(student, loader, kd_step(loss), config.distill, accelerator,
                                  desc="distill student",
                                  checkpoints=Path(config.output_dir) / "checkpoints" / "distill")
    save_model(accelerator, student, tokenizer, config.student_dir, history)
    accelerator.print(f"student saved to {config.student_dir}")

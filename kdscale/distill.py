"""`kdscale distill`: train a student made of the teacher's layers, from the cached teacher
logits (default) or from the teacher run online beside it."""

from __future__ import annotations

from pathlib import Path

from kdscale.cache import LogitCache
from kdscale.cache.collator import TeacherLogitsCollator
from kdscale.config import Config
from kdscale.data import PaddingCollator, check_sources, make_loader, prepare
from kdscale.distributed import check_launch_deepspeed_config, make_accelerator, process_state
from kdscale.intermediate import IntermediateLosses
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
from kdscale.objective import DistillStep, StudentWithProjections, intermediate_config
from kdscale.teacher import load_runner
from kdscale.train import save_model, train_loop


def run_distill(config: Config) -> None:
    # Everything that can be wrong with the inputs is checked before any model is built.
    check_sources(config.data)
    check_launch_deepspeed_config()
    layers = resolve_layers(config.student.layers, num_layers_of(config.teacher_dir))
    online = config.teacher.source == "online"
    cache = None if online else LogitCache(config.cache_dir)
    # Attention maps only come from the eager attention implementation.
    attention = "eager" if config.loss.attention_kl > 0 else None
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_classifier(config.teacher_dir, "teacher", attn_implementation=attention)
    state = process_state()
    with state.main_process_first():  # one process tokenizes, the rest read its files
        train = prepare(config.data, tokenizer, "train", label_names(teacher))
    if cache is not None:
        cache.check_compatible(data_fingerprint=train.fingerprint,
                               teacher_sha256=checkpoint_sha256(config.teacher_dir),
                               tokenizer_sha256=tokenizer_sha256(tokenizer),
                               num_outputs=teacher.config.num_labels)
    model = student = student_from_teacher(teacher, layers, config.student.dropout)
    extra = intermediate_config(config.loss)
    if extra.enabled:
        model = StudentWithProjections(student, IntermediateLosses.from_models(extra, student,
                                                                               teacher))
    del teacher  # its layers are copied; the cache or the runner stands in for its outputs
    runner = load_runner(config, state, attention) if online else None
    # Built after the models: under a ZeRO-3 config, transformers would otherwise load the
    # teacher already partitioned, and its layers could not be copied.
    accelerator = make_accelerator(config.distill, config.seed)
    collate = PaddingCollator(tokenizer.pad_token_id)
    collate = collate if cache is None else TeacherLogitsCollator(collate, cache)
    global_batch = config.distill.batch_size * accelerator.num_processes
    loader = make_loader(train, global_batch, collate, shuffle=True, seed=config.seed)
    accelerator.print(f"student: teacher layers {layers}, teacher from "
                      f"{'the cache' if cache else 'an online ' + runner.placement + ' runner'}")
    model, history = train_loop(model, loader, DistillStep(config.loss, runner),
                                config.distill, accelerator, desc="distill student",
                                checkpoints=Path(config.output_dir) / "checkpoints" / "distill")
    save_model(accelerator, model, tokenizer, config.student_dir, history,
               submodule="student" if extra.enabled else None)
    accelerator.print(f"student saved to {config.student_dir}")

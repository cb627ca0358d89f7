"""`kdscale distill`: train a student made of the teacher's layers, from the cached teacher
logits (default) or from the teacher run online beside it."""

from __future__ import annotations

from pathlib import Path

from kdscale.cache import LogitCache
from kdscale.cache.collator import EnsembleLogitsCollator, TeacherLogitsCollator
from kdscale.config import Config, ConfigError
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


def open_caches(config: Config) -> list[LogitCache]:
    """The caches the student reads: none (online teacher), one, or an ensemble."""
    if config.teacher.source == "online":
        return []
    if not config.cache.ensemble:
        return [LogitCache(config.cache_dir)]
    caches = [LogitCache(directory) for directory in config.cache.ensemble]
    for directory, cache in zip(config.cache.ensemble, caches, strict=True):
        if cache.manifest.kind != "dense":
            raise ConfigError(f"cache.ensemble: {directory} holds top-k logits; an ensemble "
                              f"averages dense caches")
    return caches


def run_distill(config: Config) -> None:
    # Everything that can be wrong with the inputs is checked before any model is built.
    check_sources(config.data)
    check_launch_deepspeed_config()
    layers = resolve_layers(config.student.layers, num_layers_of(config.teacher_dir))
    online = config.teacher.source == "online"
    caches = open_caches(config)
    # Attention maps only come from the eager attention implementation.
    attention = "eager" if config.loss.attention_kl > 0 else None
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_classifier(config.teacher_dir, "teacher", attn_implementation=attention)
    state = process_state()
    with state.main_process_first():  # one process tokenizes, the rest read its files
        train = prepare(config.data, tokenizer, "train", label_names(teacher))
    # An ensemble's caches come from other teachers by design; one cache must be this one's.
    teacher_sha = checkpoint_sha256(config.teacher_dir) if len(caches) == 1 else None
    for cache in caches:
        cache.check_compatible(data_fingerprint=train.fingerprint, teacher_sha256=teacher_sha,
                               tokenizer_sha256=tokenizer_sha256(tokenizer),
                               num_outputs=teacher.config.num_labels)
    model = student = student_from_teacher(teacher, layers, config.student.dropout)
    extra = intermediate_config(config.loss)
    if extra.enabled:
        model = StudentWithProjections(student, IntermediateLosses.from_models(extra, student,
                                                                               teacher))
    del teacher  # its layers are copied; the cache or the runner stands in for its outputs
    runner = load_runner(config, state, config.distill.batch_size, attention) if online else None
    # Built after the models: under a ZeRO-3 config, transformers would otherwise load the
    # teacher already partitioned, and its layers could not be copied.
    accelerator = make_accelerator(config.distill, config.seed)
    collate = PaddingCollator(tokenizer.pad_token_id)
    if len(caches) > 1:
        collate = EnsembleLogitsCollator(collate, caches)
    elif caches:
        collate = TeacherLogitsCollator(collate, caches[0])
    global_batch = config.distill.batch_size * accelerator.num_processes
    loader = make_loader(train, global_batch, collate, shuffle=True, seed=config.seed)
    source = (f"{len(caches)} caches averaged" if len(caches) > 1 else "the cache" if caches
              else f"an online {runner.placement} runner")
    accelerator.print(f"student: teacher layers {layers}, teacher from {source}")
    step = DistillStep(config.loss, runner, config.cache.ensemble_weights)
    model, history = train_loop(model, loader, step,
                                config.distill, accelerator, desc="distill student",
                                checkpoints=Path(config.output_dir) / "checkpoints" / "distill")
    save_model(accelerator, model, tokenizer, config.student_dir, history,
               submodule="student" if extra.enabled else None)
    accelerator.print(f"student saved to {config.student_dir}")

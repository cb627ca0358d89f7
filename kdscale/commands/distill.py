"""`kdscale distill`: train a student made of the teacher's layers, from the cached teacher
logits (default) or from the teacher run online beside it."""

from __future__ import annotations

from kdscale.cache import LogitCache
from kdscale.cache.collator import EnsembleLogitsCollator, TeacherLogitsCollator
from kdscale.cache.verify import verify_cache
from kdscale.commands.stage import begin_stage, start_accelerator, train_and_save
from kdscale.config import Config, ConfigError, StudentConfig
from kdscale.config.intermediate import intermediate_config
from kdscale.config.model_fields import resolve_layers
from kdscale.data import check_unknown_rate, make_loader
from kdscale.models import (
    build_student,
    check_inputs_fit,
    check_student_model,
    checkpoint_sha256,
    load_model,
    load_tokenizer,
    num_layers_of,
    tokenizer_sha256,
)
from kdscale.tasks import CacheLayout, Task
from kdscale.teacher import check_teacher_deepspeed_config, load_runner, teacher_source
from kdscale.train.intermediate import IntermediateLosses
from kdscale.train.loop import save_model
from kdscale.train.objective import DistillStep, StudentWithProjections
from kdscale.train.periodic_eval import PeriodicEval


def open_caches(config: Config, task: Task) -> list[LogitCache]:
    """The caches the student reads: none (online teacher, hard labels), one, or an ensemble."""
    if teacher_source(config) != "cache":
        return []
    if not config.cache.ensemble:
        cache = LogitCache(config.cache_dir)
        _check_kind(cache, task, "cache.dir", config.cache_dir)
        return _verified(config, [cache])
    if task.name != "classification":
        raise ConfigError(f"cache.ensemble: averaging teachers is for classification; task "
                          f"{task.name} reads one cache (cache.dir)")
    caches = [LogitCache(directory) for directory in config.cache.ensemble]
    for directory, cache in zip(config.cache.ensemble, caches, strict=True):
        if cache.manifest.kind != "dense":
            raise ConfigError(f"cache.ensemble: {directory} holds top-k logits; an ensemble "
                              f"averages dense caches")
    return _verified(config, caches)


def _verified(config: Config, caches: list[LogitCache]) -> list[LogitCache]:
    """Every byte the student will read, checked before the first step: a damaged shard
    found at its batch would stop the job hours in, or train on it unseen."""
    if config.cache.verify:
        for cache in caches:
            verify_cache(cache.directory, cache.manifest)
    return caches


def _check_kind(cache: LogitCache, task: Task, key: str, directory) -> None:
    """A per-position cache (MLM, tokens) for a per-position task; a dense one otherwise."""
    m = cache.manifest
    per_position = task.per_position
    if cache.per_position == per_position and (per_position or m.kind == "dense"):
        return
    got = "dense logits" if m.kind == "dense" else f"top-{m.k} logits" + (
        " per position" if cache.per_position else " per example")
    want = "a per-position top-k cache" if per_position else "a dense cache"
    raise ConfigError(f"{key}: {directory} holds {got}; task {task.name} distils from {want} "
                      f"(`kdscale cache` with task {task.name} builds it)")


def run_distill(config: Config) -> None:
    # Everything that can be wrong with the inputs is checked before any model is built.
    stage = begin_stage(config, "distill")
    check_student_model(config.student, config.teacher_dir)
    if not config.student.model:
        resolve_layers(config.student.layer_spec, num_layers_of(config.teacher_dir))
    online = teacher_source(config) == "online"
    if online:
        check_teacher_deepspeed_config(config.teacher)
    task = stage.task
    caches = open_caches(config, task)
    # Attention maps only come from the eager attention implementation.
    attention = "eager" if config.loss.attention_kl > 0 else None
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_model(config.teacher_dir, "teacher", attention, task.model_class)
    check_inputs_fit(teacher.config, tokenizer, config.data.max_length, "the teacher")
    labels = task.label_names(teacher.config)
    with stage.state.main_process_first():  # one process tokenizes, the rest read its files
        train = task.transfer_set(config, tokenizer, labels)
    check_unknown_rate(train, tokenizer, f"the tokenizer of {config.teacher_dir}")
    check_caches(config, caches, train, task.cache_layout(config, teacher.config), tokenizer)
    model = student = build_student(config.student, task.student_source(config.student, teacher))
    extra = intermediate_config(config.loss)
    if extra.enabled:
        model = StudentWithProjections(student, IntermediateLosses.from_models(extra, student,
                                                                               teacher))
    del teacher  # its layers are copied; the cache or the runner stands in for its outputs
    runner = (load_runner(config, stage.state, config.distill.batch_size, attention)
              if online else None)
    accelerator = start_accelerator(stage)
    loader = train_loader(config, task, train, tokenizer, caches, accelerator.num_processes)
    source = (f"{len(caches)} caches averaged" if len(caches) > 1 else "the cache" if caches
              else f"an online {runner.placement} runner" if runner
              else "nowhere (loss.alpha is 0: hard labels only)")
    accelerator.print(f"student: {describe_student(config.student)}, teacher from {source}")
    submodule = "student" if extra.enabled else None
    evaluator = periodic_eval(config, task, accelerator, tokenizer, labels, submodule)
    step = DistillStep(config.loss, runner, config.cache.ensemble_weights, task)
    train_and_save(stage, accelerator, model, loader, step, what="student", tokenizer=tokenizer,
                   save_to=config.student_dir, data_fingerprint=train.fingerprint,
                   evaluator=evaluator, submodule=submodule)


def check_caches(config: Config, caches: list[LogitCache], train, layout: CacheLayout,
                 tokenizer) -> None:
    # An ensemble's caches come from other teachers by design; one cache must be this one's.
    teacher_sha = checkpoint_sha256(config.teacher_dir) if len(caches) == 1 else None
    for cache in caches:
        cache.check_compatible(data_fingerprint=train.fingerprint, teacher_sha256=teacher_sha,
                               tokenizer_sha256=tokenizer_sha256(tokenizer),
                               num_outputs=layout.num_outputs, masking=layout.masking)
        cache.check_temperature(config.loss.temperature)


def train_loader(config: Config, task: Task, train, tokenizer, caches: list[LogitCache],
                 processes: int):
    collate = task.collator(tokenizer)
    if len(caches) > 1:
        collate = EnsembleLogitsCollator(collate, caches)
    elif caches:
        collate = TeacherLogitsCollator(collate, caches[0])
    return make_loader(train, config.distill.batch_size * processes, collate, shuffle=True,
                       seed=config.seed)


def describe_student(student: StudentConfig) -> str:
    origin = student.model or "the teacher"
    return f"layers {student.layer_spec} of {origin}"


def periodic_eval(config: Config, task: Task, accelerator, tokenizer, labels: list[str],
                  submodule: str | None) -> PeriodicEval | None:
    """Evaluation every `distill.eval_every` steps, the best student kept in student_best/."""
    every = config.distill.eval_every
    if not every:
        return None
    with accelerator.main_process_first():
        eval_data = task.load_split(config, tokenizer, "eval", labels)
    global_batch = config.eval.batch_size * accelerator.num_processes
    loader = make_loader(eval_data, global_batch, task.collator(tokenizer), shuffle=False)

    def save_best(model, history):
        save_model(accelerator, model, tokenizer, config.student_best_dir, history, submodule)

    return PeriodicEval(accelerator, loader, every, save_best, task)

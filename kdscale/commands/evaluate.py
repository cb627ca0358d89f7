"""`kdscale eval`: accuracy (and F1 for two classes), parameters and latency of the teacher and
the student on the eval split, and the report comparing them."""

from __future__ import annotations

import statistics
import time

import torch

from kdscale.commands.report import build_report, print_table, write_report
from kdscale.config import Config
from kdscale.data import TaskData, check_sources, check_unknown_rate, make_loader
from kdscale.data.batch import model_inputs
from kdscale.distributed import process_state
from kdscale.files import check_writable
from kdscale.models import (
    CheckpointError,
    check_inputs_fit,
    count_parameters,
    load_model,
    load_tokenizer,
)
from kdscale.tasks import Task, get_task
from kdscale.tasks.classification_metrics import classification_metrics, predict


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, batch: dict, repeats: int, warmup: int = 3) -> float:
    """Median wall time of one forward pass over `batch`, in milliseconds."""
    model.eval()
    inputs = model_inputs(batch)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(**inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def evaluate_model(model: torch.nn.Module, loader, latency_batch: dict, repeats: int,
                   task: Task | None = None, data: TaskData | None = None) -> dict:
    if task is None:  # a sequence classifier
        preds, labels = predict(model, loader)
        metrics = classification_metrics(preds, labels, model.config.num_labels)
    else:
        metrics = task.metrics(model, loader, data)
    metrics["params"] = count_parameters(model)
    metrics["layers"] = model.config.num_hidden_layers
    metrics["latency_ms"] = latency_ms(model, latency_batch, repeats)
    return metrics


def median_length_batch(loader) -> dict:
    """A batch of typical length for timing (the eval loader's batches are length-sorted)."""
    batches = list(loader)
    return batches[len(batches) // 2]


def check_finite(model: torch.nn.Module, what: str) -> None:
    """A model with NaN or infinite weights scores like chance; its report would mislead."""
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise CheckpointError(f"{what} holds weights that are not finite ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); expected a trained model: "
                              f"retrain it")


def run_eval(config: Config) -> dict | None:
    """Evaluate on the main process (the eval split is small); returns the report there."""
    check_sources(get_task(config.task).data_config(config))
    check_writable(config.output_dir, "output_dir")  # the report goes there, after the work
    state = process_state()
    report = evaluate_and_report(config) if state.is_main_process else None
    state.wait_for_everyone()
    return report


def evaluate_and_report(config: Config) -> dict:
    task = get_task(config.task)
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_model(config.teacher_dir, "teacher", model_class=task.model_class)
    student = load_model(config.student_dir, "student", model_class=task.model_class)
    for name, model, directory in (("the teacher", teacher, config.teacher_dir),
                                   ("the student", student, config.student_dir)):
        check_inputs_fit(model.config, tokenizer, config.data.max_length, name)
        check_finite(model, f"{name} ({directory})")
    eval_data = task.load_split(config, tokenizer, "eval", task.label_names(teacher.config))
    check_unknown_rate(eval_data, tokenizer, f"the tokenizer of {config.teacher_dir}")
    loader = make_loader(eval_data, config.eval.batch_size, task.collator(tokenizer),
                         shuffle=False)
    timing_batch = median_length_batch(loader)
    results = {name: evaluate_model(model, loader, timing_batch, config.eval.latency_batches,
                                    task, eval_data)
               for name, model in (("teacher", teacher), ("student", student))}
    report = build_report(config, results, task.primary_metric)
    print_table(report)
    write_report(report, config.output_dir)
    return report

"""What one distillation step computes: the KD loss on the logits (teacher from the cache or
run online), with its temperature and alpha on their schedules, plus the losses beyond
logits when the teacher runs online."""

from __future__ import annotations

import torch
from torch import nn

from kdscale.config import LossConfig
from kdscale.config.intermediate import intermediate_config
from kdscale.config.schedules import Schedule
from kdscale.data.batch import model_inputs, valid_rows
from kdscale.tasks import Task, get_task
from kdscale.teacher import TeacherRunner
from kdscale.train.intermediate import IntermediateLosses
from kdscale.train.losses import KDLoss
from kdscale.train.timing import StepTimer


class StudentWithProjections(nn.Module):
    """The student and the learned projections of the hidden-state loss: both are trained,
    so both go through the optimizer (and ZeRO); only the student is saved."""

    def __init__(self, student: nn.Module, intermediate: IntermediateLosses):
        super().__init__()
        self.student, self.intermediate = student, intermediate

    def forward(self, **inputs):
        return self.student(**inputs)


def ensemble_logits(logits: torch.Tensor, weights: list[float] | None,
                    temperature: float) -> torch.Tensor:
    """Logits z whose softmax(z / T) is the weighted mean of the K teachers' softmax(z_k / T):
    the teachers are averaged in probability space at the distillation temperature.
    logits: (K, B, C) -> (B, C)."""
    k = logits.shape[0]
    w = torch.tensor(weights if weights else [1.0] * k, dtype=logits.dtype)
    log_w = (w / w.sum()).log().view(k, 1, 1)
    log_mix = torch.logsumexp(log_w + torch.log_softmax(logits / temperature, dim=-1), dim=0)
    return temperature * log_mix


class DistillStep:
    """`step(model, batch)` -> sums over the batch's valid rows, as the training loop wants."""

    def __init__(self, loss: LossConfig, teacher: TeacherRunner | None = None,
                 ensemble_weights: list[float] | None = None, task: Task | None = None):
        self.task = task or get_task("classification")
        self.temperature = Schedule.from_value(loss.temperature)
        self.alpha = Schedule.from_value(loss.alpha)
        self.teacher, self.total_steps, self.step_index = teacher, 1, 0  # see set_step
        self.needs = intermediate_config(loss)
        self.weights = ensemble_weights

    def set_step(self, step: int, total_steps: int) -> None:
        self.step_index, self.total_steps = step, total_steps

    def kd_loss(self) -> KDLoss:
        return KDLoss(self.temperature.value(self.step_index, self.total_steps),
                      self.alpha.value(self.step_index, self.total_steps))

    def __call__(self, model: nn.Module, batch: dict, timer: StepTimer) -> dict[str, torch.Tensor]:
        flags = {"output_hidden_states": self.needs.hidden_mse > 0 or self.needs.hidden_cosine > 0,
                 "output_attentions": self.needs.attention_kl > 0}
        teacher = None
        if self.teacher is not None:
            with timer.phase("teacher"), self.task.head_context(self.teacher.model, batch):
                teacher = self.teacher.outputs(batch, **flags)
        with timer.phase("forward"), self.task.head_context(model, batch):
            student = model(**model_inputs(batch), **flags)
        with timer.phase("loss"):
            rows, labels = self.task.rows(self.task.label_logits(student, batch), batch)
            parts = self.kd_loss().parts(rows, labels=labels, reduction="sum",
                                         **self._teacher_rows(batch, teacher))
            if self.needs.enabled:
                parts = self._add_intermediate(model, parts, student, teacher, batch)
        return parts

    def _teacher_rows(self, batch: dict, teacher) -> dict[str, torch.Tensor]:
        """kd_loss's teacher arguments, row for row with the student's."""
        if teacher is not None:
            label_logits = self.task.label_logits(teacher, batch).float()
            return {"teacher_logits": self.task.rows(label_logits, batch)[0]}
        if "teacher_logits_ensemble" in batch:
            mixed = ensemble_logits(batch["teacher_logits_ensemble"].float(), self.weights,
                                    self.temperature.value(self.step_index, self.total_steps))
            return {"teacher_logits": mixed}
        if any(key.startswith("teacher_") for key in batch):
            return self.task.cached_teacher(batch)
        return {}  # a hard-label run: KDLoss.parts computes the hard term alone

    def _add_intermediate(self, model, parts, student, teacher, batch) -> dict:
        losses = _unwrap(model).intermediate
        extra = losses(student, teacher, batch["attention_mask"])
        # Intermediate losses are means over tokens; weigh them by the batch's rows so the
        # loop's division by the step's rows gives their mean over the step.
        rows = valid_rows(batch).float()
        total = extra.pop("total") * rows
        named = {name: value.detach() * rows for name, value in extra.items()}
        return {**parts, "loss": parts["loss"] + total, **named}


def _unwrap(model: nn.Module) -> StudentWithProjections:
    while not isinstance(model, StudentWithProjections):
        model = model.module  # DDP / DeepSpeed engine
    return model

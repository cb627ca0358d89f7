"""Distillation in an existing Hugging Face `Trainer` script, changing four lines:

    from kdscale.hf import DistillationTrainer, DistillationTrainingArguments, end_process
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationTrainingArguments))
    trainer = DistillationTrainer(model=model, args=training_args, ...)   # was Trainer(...)
    end_process()   # after main(): launched processes end together, without the teardown

and running it with `--kd_cache DIR` (logits from `kdscale cache`) or `--kd_teacher DIR` (the
teacher run beside the student). Everything else stays the Trainer's: `--deepspeed ds.json`,
`accelerate launch`, callbacks, logging, checkpoints and `resume_from_checkpoint`.

The loss is kdscale's (`kdscale.train.objective.DistillStep`, the definition in
`kdscale.kernels.reference`); the logs gain `kd_soft` (T^2 * KL) and `kd_hard` (cross-entropy),
means per labelled row. `eval_loss` is the student's cross-entropy, mean per labelled row.
On CPU machines the launched processes are joined over gloo (see `join_cpu_processes`).
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from transformers import Trainer

from kdscale.cache import LogitCache, TeacherLogitsCollator
from kdscale.config.intermediate import intermediate_config
from kdscale.data.batch import IGNORE_INDEX, model_inputs, valid_rows
from kdscale.distributed import reduce_sum
from kdscale.errors import KdscaleError
from kdscale.hf.arguments import DistillationArguments, DistillationTrainingArguments
from kdscale.hf.inputs import check_tokenizer
from kdscale.hf.setup import (
    ID_COLUMN,
    check_cache,
    check_labels,
    check_teacher,
    load_teacher,
    settle_launch,
    teacher_config_of,
    with_example_ids,
)
from kdscale.train.intermediate import IntermediateLosses
from kdscale.train.objective import DistillStep, StudentWithProjections
from kdscale.train.timing import StepTimer

__all__ = ["DistillationArguments", "DistillationTrainer", "DistillationTrainingArguments"]

# Batch entries that feed the loss, never the student's forward.
TEACHER_KEYS = ("teacher_logits", "teacher_topk_values", "teacher_topk_indices",
                "teacher_topk_positions", "teacher_topk_counts", ID_COLUMN)


class DistillationTrainer(Trainer):
    """A `Trainer` whose training loss distills a teacher into `model` (the student).

    The teacher comes from `kd_args.kd_cache` (a kdscale logit cache) or from `teacher` /
    `kd_args.kd_teacher` (a model, or a checkpoint directory loaded in `kd_teacher_placement`).
    It is never prepared with the student and never saved: checkpoints hold the student only.
    `kd_args` may be left out when `args` is a `DistillationTrainingArguments`.

    Args:
        model: the student, a sequence classifier with the teacher's labels.
        args: the script's `TrainingArguments` (or `DistillationTrainingArguments`).
        *trainer_args: the rest of `Trainer`'s positional arguments.
        kd_args: the `--kd_*` settings (`DistillationArguments`).
        teacher: a teacher model or checkpoint directory, instead of `kd_args.kd_teacher`.
        **trainer_kwargs: `Trainer`'s keyword arguments (`train_dataset`, `data_collator`,
            `processing_class`, ...), unchanged.

    Raises:
        KdscaleError: at construction, for a cache that does not cover or was not built from
            `train_dataset`, a teacher of other labels or vocabulary, or rows without ids.
    """

    # compute_loss divides by the valid rows of the whole accumulation window itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module | None = None, args=None, *trainer_args,
                 kd_args: DistillationArguments | None = None,
                 teacher: str | nn.Module | None = None, **trainer_kwargs):
        settle_launch(args)  # before the Trainer builds its Accelerator
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.kd = _settings(kd_args, self.args)
        source = self._teacher_source(teacher)
        check_labels(self.train_dataset, self.model.config.num_labels)
        check_tokenizer(self.processing_class, self.model.config, self.train_dataset)
        self.cache = self._open_cache() if self.kd.kd_cache else None
        self.teacher = self._start_teacher(source) if source is not None else None
        self.intermediate = None
        if self.kd.intermediate_enabled:  # needs the live teacher (_open_cache refuses a cache)
            self.intermediate = IntermediateLosses.from_models(
                intermediate_config(self.kd.loss_config()), self.model, self.teacher.model)
        self.step = DistillStep(self.kd.loss_config(), self.teacher)
        self._timer = StepTimer(enabled=False)  # the Trainer's own logs report speed
        self._kd_sums: dict[str, torch.Tensor] = {}
        self._print_plan()

    def _teacher_source(self, teacher: str | nn.Module | None) -> str | nn.Module | None:
        """The live teacher (None when distilling from the cache); exactly one source."""
        source = teacher if teacher is not None else self.kd.kd_teacher
        if self.kd.kd_cache and source is not None:
            raise KdscaleError(f"give one teacher source: the cache {self.kd.kd_cache} or the "
                               f"teacher {source if isinstance(source, str) else 'model'}")
        if not self.kd.kd_cache and source is None:
            raise KdscaleError("no teacher: set --kd_cache (a `kdscale cache` directory) or "
                               "--kd_teacher (a fine-tuned teacher), or pass teacher=")
        if self.model is None:
            raise KdscaleError("DistillationTrainer needs the student as model= (model_init "
                               "is not supported)")
        return source

    def _open_cache(self) -> LogitCache:
        if self.kd.intermediate_enabled:
            raise KdscaleError("--kd_hidden_mse, --kd_hidden_cosine and --kd_attention_kl need "
                               "the teacher's hidden states: run it live with --kd_teacher; a "
                               "cache holds logits only")
        cache = LogitCache(self.kd.kd_cache)
        if self.kd.kd_cache_verify:  # a damaged shard found at its batch would stop the run late
            cache.verify(echo=PartialState().print, skip_with="pass --kd_cache_verify false")
        if self.train_dataset is not None:
            self.train_dataset = with_example_ids(self.train_dataset)
            check_cache(cache, self.train_dataset, self.model.config.num_labels)
        return cache

    def _start_teacher(self, source: str | nn.Module):
        config, where = teacher_config_of(source)
        check_teacher(config, self.model.config, where, self.kd)
        if self.kd.kd_attention_kl > 0:  # SDPA and flash attention return no maps
            self.model.set_attn_implementation("eager")
        return load_teacher(source, self.kd, self.args.per_device_train_batch_size,
                            self.args.device)

    def _print_plan(self) -> None:
        if self.cache is not None:
            m = self.cache.manifest
            origin = (f"cached logits from {self.cache.directory} ({m.num_examples} examples, "
                      f"{m.num_outputs} logits each, {m.dtype})")
        else:
            origin = (f"a live teacher ({self.teacher.placement}, "
                      f"{self.teacher.num_params:,} parameters)")
        extra = "".join(f", {name}={getattr(self.kd, name)}" for name in
                        ("kd_hidden_mse", "kd_hidden_cosine", "kd_attention_kl")
                        if getattr(self.kd, name) > 0)
        a = self.args
        rows = a.world_size * a.per_device_train_batch_size * a.gradient_accumulation_steps
        PartialState().print(
            f"distillation: {origin}; T={self.kd.kd_temperature}, alpha={self.kd.kd_alpha}"
            f"{extra}; {a.world_size} process(es) x {a.per_device_train_batch_size} rows x "
            f"{a.gradient_accumulation_steps} accumulation = {rows} rows per step")

    # -- data ------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops the columns the model's forward does not take; the example id
        # must reach the collator, which looks the teacher's logits up by it.
        super()._set_signature_columns_if_needed()
        if ID_COLUMN not in self._signature_columns:
            self._signature_columns.append(ID_COLUMN)

    def get_train_dataloader(self):
        """The Trainer's training loader; from a cache, its batches carry the teacher's logits."""
        if self.cache is None:
            return super().get_train_dataloader()
        # The Trainer builds every loader from self.data_collator; only training batches carry
        # cached logits (evaluation ids are not in the cache).
        base = self.data_collator
        self.data_collator = TeacherLogitsCollator(base, self.cache)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = base

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The next accumulation window's batches, and its labelled rows on all processes.

        The loss is divided by that count, so a step's gradient is that of the mean over the
        window, whatever the accumulation, batch split and number of processes.

        Args:
            epoch_iterator: the training batches.
            num_batches: the batches of one accumulation window.
            device: where the count is made and summed over processes.

        Returns:
            (batches, rows): the list of batches and a 0-d int64 tensor.
        """
        batches = list(islice(epoch_iterator, num_batches))
        rows = sum((valid_rows(b).to(device) for b in batches), torch.zeros((), device=device,
                                                                        dtype=torch.long))
        return batches, reduce_sum(self.accelerator, rows)

    # -- loss ------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The distillation loss in training; the student's cross-entropy in evaluation.

        In training, the loss is summed over this batch's labelled rows, divided by
        `num_items_in_batch` and multiplied by the processes, whose gradients are averaged;
        the `kd_*` terms are kept for the next log.

        Args:
            model: the student (as the Trainer wrapped it).
            inputs: a batch: the student's inputs and labels, and the teacher's outputs
                when they come from a cache.
            return_outputs: also return the model's outputs (None in training).
            num_items_in_batch: the window's labelled rows on all processes (from
                `get_batch_samples`); None: the mean over this batch.

        Returns:
            The 0-d loss, or (loss, outputs) with `return_outputs`.
        """
        if not model.training:
            return self._student_loss(model, inputs, return_outputs)
        student = model if self.intermediate is None else \
            StudentWithProjections(model, self.intermediate)  # where DistillStep finds them
        parts = self.step(student, inputs, self._timer)
        rows = valid_rows(inputs)
        self._add_to_log(parts, rows)
        if num_items_in_batch is None:
            loss = parts["loss"] / rows.clamp(min=1)
        else:
            loss = parts["loss"] * self.accelerator.num_processes / num_items_in_batch
        return (loss, None) if return_outputs else loss

    def _student_loss(self, model: nn.Module, inputs: dict, return_outputs: bool):
        """Evaluation: the student's cross-entropy, mean over the batch's labelled rows. (The
        Trainer's default multiplies a model's loss by the processes, for losses normalized
        over all of them; BERT's classification loss is not, and would read P times too big.)"""
        outputs = model(**model_inputs(inputs))
        ce = F.cross_entropy(outputs.logits.float(), inputs["labels"], ignore_index=IGNORE_INDEX,
                             reduction="sum")
        loss = ce / valid_rows(inputs).clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's, on the batch without the teacher's entries the student cannot take."""
        inputs = {k: v for k, v in inputs.items() if k not in TEACHER_KEYS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # -- logging ---------------------------------------------------------------------------

    def _add_to_log(self, parts: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        for name, value in parts.items():
            if name != "loss":
                self._kd_sums[name] = self._kd_sums.get(name, 0.0) + value.detach().float()
        self._kd_sums["rows"] = self._kd_sums.get("rows", 0.0) + rows.float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log as the Trainer does, with the distillation terms added to training logs.

        A training log gains kd_soft, kd_hard (and kd_<intermediate loss>): means per labelled
        row since the last log, over all processes (every process logs together).

        Args:
            logs: the Trainer's values to log.
            start_time: passed on to the Trainer.
        """
        if "loss" in logs and self._kd_sums:
            names = [n for n in self._kd_sums if n != "rows"]
            sums = reduce_sum(self.accelerator,
                              torch.stack([self._kd_sums[n] for n in [*names, "rows"]]))
            means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
            logs = {**logs, **{f"kd_{n}": round(v, 6) for n, v in zip(names, means, strict=True)}}
            self._kd_sums = {}
        super().log(logs, start_time)


def _settings(kd_args: DistillationArguments | None, args) -> DistillationArguments:
    if kd_args is not None:
        return kd_args
    if isinstance(args, DistillationArguments):
        return args
    raise KdscaleError("DistillationTrainer needs its settings: pass kd_args= (a "
                       "DistillationArguments), or parse DistillationTrainingArguments in "
                       "place of TrainingArguments")


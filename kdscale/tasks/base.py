"""What differs between the tasks kdscale distils, behind one small interface.

Every task turns a model's outputs into *label logits*: a tensor shaped like the batch's
`labels` plus one axis of outputs, so that label logits `[..., V]` and `labels [...]` line
up entry for entry. An entry whose label is -100 is not a row of the loss (and one labelled
-1, an augmented copy, is a row of its soft term only). That one idea carries every task
through the shared machinery:

    task                    labels          label logits     rows of the loss
    classification          [B]             [B, classes]     every example
    mlm                     [B, L]          [B, L, vocab]    the masked positions
    pretraining             [B, L]          [B, L, vocab]    masked positions + [CLS] (NSP)
    token-classification    [B, L]          [B, L, tags]     the first piece of each word
    question-answering      [B, 2]          [B, 2, L]        start and end of each feature

The loss, fine-tuning, evaluation during training and the cache all work on `rows`: the
label logits of the valid entries, in row-major order (example, then position). A cache
stores the teacher's rows per example (dense), or only the valid positions' rows (per
position, top-k) with each row's position, so a student batch finds its teacher rows by
example id and checks them against its own positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kdscale.cache.format import CacheError
from kdscale.cache.sampling import sampled_rows
from kdscale.config import Config, ConfigError, DataConfig, StudentConfig, TeacherConfig
from kdscale.config.model_fields import teacher_config_from_dict
from kdscale.data import PaddingCollator, TaskData
from kdscale.data.batch import IGNORE_INDEX
from kdscale.models import checkpoint_errors

PAD_LOGIT = -1e4  # a padded output: no probability after softmax, and finite in fp16


@dataclass(frozen=True)
class CacheLayout:
    """How a task's teacher outputs are stored (see kdscale.cache.format)."""
    kind: str  # "dense" | "topk"
    num_outputs: int  # classes, vocabulary, tags, or 2 x max_length positions (QA)
    k: int | None  # slots per top-k row
    per_position: bool  # one row per valid position (masked token, word start)
    # The recipe of the data's random draws, which the cache must share with its readers:
    # an MLM cache's fixed masks, or a classification cache's augmented copies.
    masking: dict | None = None
    # topk with a tail slot: the temperature of each row's tail mass; None: no tail.
    tail_temperature: float | None = None
    # topk rows of drawn tokens (cache.kind sampled): sampling_recipe's draws, temperature
    # and seed; None: the largest logits.
    sampling: dict | None = None

    def meta(self) -> dict:
        """The manifest fields this layout decides."""
        return {"kind": self.kind, "num_outputs": self.num_outputs, "k": self.k,
                "masking": self.masking, "tail_temperature": self.tail_temperature,
                "sampling": self.sampling}


class Task:
    """The classification behaviour is the default; other tasks override what differs."""

    name = "classification"
    model_class: type  # a transformers Auto class, e.g. AutoModelForSequenceClassification
    primary_metric = "accuracy"  # what retention and "best" compare
    per_position = False  # cached as one top-k row per labelled position, not per example

    # -- models ---------------------------------------------------------------------------

    def new_model(self, cfg: TeacherConfig, labels: list[str]) -> PreTrainedModel:
        """The teacher to fine-tune: pretrained (teacher.model) or built (teacher.config),
        with a new head for `labels`."""
        if cfg.config is not None:
            config = teacher_config_from_dict(cfg.config, self.head_size(labels))
            return self.model_class.from_config(config)
        if cfg.model is None:
            raise ConfigError("teacher: set teacher.model (hub name or local directory) or "
                              "teacher.config (inline model config)")
        with checkpoint_errors(f"teacher.model {cfg.model}"):
            return self.from_pretrained(cfg.model, labels or None)

    def student_source(self, cfg: StudentConfig, teacher: PreTrainedModel) -> PreTrainedModel:
        """Whose layers the student keeps: the teacher's, or those of the pretrained
        `student.model`, loaded with the teacher's head."""
        if cfg.model is None:
            return teacher
        labels = self.label_names(teacher.config)
        with checkpoint_errors(f"student.model {cfg.model}"):
            return self.from_pretrained(cfg.model, labels or None)

    def head_size(self, labels: list[str]) -> int:
        """Outputs of a new head: one per class or tag."""
        return len(labels)

    def from_pretrained(self, name_or_dir, labels: list[str] | None = None,
                        **options) -> PreTrainedModel:
        """A saved model of this task's class; `labels` names a new head's outputs."""
        if labels is not None:
            options |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                        "label2id": {name: i for i, name in enumerate(labels)}}
        return self.model_class.from_pretrained(str(name_or_dir), **options)

    def label_names(self, model_config) -> list[str]:
        """The output names a fine-tuned model stored (classes or tags)."""
        return [str(model_config.id2label[i]) for i in range(model_config.num_labels)]

    # -- data -----------------------------------------------------------------------------

    def data_config(self, config: Config) -> DataConfig:
        """`data:` as this task reads it (a masked LM has no label column)."""
        return config.data

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        raise NotImplementedError

    def transfer_set(self, config: Config, tokenizer,
                     label_names: list[str] | None = None) -> TaskData:
        """What a student is distilled on, and the cache holds: the training split, plus the
        data.augment copies where the task builds them (classification)."""
        return self.load_split(config, tokenizer, "train", label_names)

    def collator(self, tokenizer):
        return PaddingCollator(tokenizer.pad_token_id)

    # -- outputs, rows and the loss -------------------------------------------------------

    def head_context(self, model: torch.nn.Module, batch: dict):
        """A context for the model's forward on `batch`: a task whose loss reads few
        positions runs the output head on those alone (masked LM); none by default."""
        return contextlib.nullcontext()

    def label_logits(self, outputs, batch: dict) -> torch.Tensor:
        return outputs.logits

    def rows(self, label_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [R, V], labels [R]): the entries of the loss, row-major."""
        valid = batch["labels"] != IGNORE_INDEX
        return label_logits[valid], batch["labels"][valid]

    def cached_teacher(self, batch: dict) -> dict[str, torch.Tensor]:
        """kd_loss's teacher arguments, rows aligned with `rows`, from a batch the cache
        collator filled."""
        if "teacher_topk_positions" in batch:
            check_positions(batch)
        if "teacher_topk_values" in batch:
            teacher = {"teacher_topk_values": batch["teacher_topk_values"].float(),
                       "teacher_topk_indices": batch["teacher_topk_indices"]}
            if "teacher_topk_tail" in batch:
                teacher["teacher_topk_tail"] = batch["teacher_topk_tail"]
            return teacher
        dense = self.from_cache(batch["teacher_logits"].float(), batch)
        return {"teacher_logits": self.rows(dense, batch)[0]}

    # -- the cache ------------------------------------------------------------------------

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        cache = config.cache
        kind = "dense" if cache.kind == "dense" else "topk"  # sampled rows are top-k rows
        return CacheLayout(kind, model_config.num_labels, None if kind == "dense" else cache.k,
                           self.per_position, tail_temperature=tail_temperature(config),
                           sampling=sampling_recipe(config))

    def to_cache(self, label_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-example label logits -> the [B, num_outputs] rows a dense cache stores."""
        return label_logits.reshape(len(label_logits), -1)

    def from_cache(self, stored: torch.Tensor, batch: dict) -> torch.Tensor:
        """The inverse of `to_cache`, for a student batch."""
        return stored

    # -- evaluation -----------------------------------------------------------------------

    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        raise NotImplementedError


def full_rows(task: Task, layout: CacheLayout, outputs, batch: dict) -> torch.Tensor:
    """The teacher's rows [R, num_outputs] of one batch, in full: what a cache stores (all of
    it dense, the top k of each row top-k), in the cache's row order."""
    logits = task.label_logits(outputs, batch).float()
    if not layout.per_position:
        return task.to_cache(logits, batch)
    if logits.dim() == 2:  # the head ran on the rows alone (Task.head_context)
        return logits
    return logits[(batch["labels"] != IGNORE_INDEX).to(logits.device)]


def cache_entries(task: Task, layout: CacheLayout, outputs, batch: dict) -> dict:
    """One teacher batch as shard tensors (kdscale.cache.write_shard's arguments)."""
    rows = full_rows(task, layout, outputs, batch).cpu()
    ids = batch["example_id"].cpu()
    if layout.kind == "dense":
        return {"example_ids": ids, "logits": rows}
    if not layout.per_position:
        return {"example_ids": ids, **topk_entries(rows, layout, ids, torch.zeros_like(ids))}
    valid = (batch["labels"] != IGNORE_INDEX).cpu()
    where = valid.nonzero()  # (example in batch, position), row-major like `rows`
    row_ids = ids[where[:, 0]]
    return {"example_ids": row_ids, **topk_entries(rows, layout, row_ids, where[:, 1]),
            "positions": where[:, 1], "empty_ids": ids[~valid.any(dim=1)]}


def topk_entries(rows: torch.Tensor, layout: CacheLayout, example_ids: torch.Tensor,
                 positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """A top-k row of each row: its k largest logits and their indices (and, for a cache with
    a tail slot, the mass the full distribution at its temperature puts off those k), or, for
    a sampled cache, its drawn tokens (kdscale.cache.sampling)."""
    if layout.sampling is not None:
        return sampled_rows(rows, example_ids, positions, layout.k,
                            layout.sampling["temperature"], layout.sampling["seed"])
    values, indices = rows.topk(layout.k, dim=-1)
    out = {"values": values, "indices": indices.int()}
    if layout.tail_temperature is not None:
        probs = torch.softmax(rows / layout.tail_temperature, dim=-1)
        out["tail"] = (1 - probs.gather(1, indices).sum(dim=-1)).clamp(0, 1)
    return out


def tail_temperature(config: Config) -> float | None:
    """The temperature a top-k cache stores its tails at (loss.temperature), or None."""
    if not (config.cache.tail and config.cache.kind == "topk"):
        return None
    return float(config.loss.temperature)


def sampling_recipe(config: Config) -> dict | None:
    """How a sampled cache draws its tokens, recorded so a reader can refuse another."""
    if config.cache.kind != "sampled":
        return None
    return {"draws": config.cache.k, "temperature": float(config.loss.temperature),
            "seed": config.seed}


def check_positions(batch: dict) -> None:
    """A per-position cache's rows must sit where this batch's labels are: the masks (or
    word starts) the cache was built with are the data's."""
    valid = batch["labels"] != IGNORE_INDEX
    want = valid.nonzero()[:, 1]
    counts = valid.sum(dim=1)
    got, got_counts = batch["teacher_topk_positions"], batch["teacher_topk_counts"]
    if not (torch.equal(counts.cpu(), got_counts.cpu())
            and torch.equal(want.cpu(), got.to(want.dtype).cpu())):
        bad = (counts.cpu() != got_counts.cpu()).nonzero()[:, 0]
        ids = batch["example_id"][bad if len(bad) else slice(None)].tolist()[:5]
        raise CacheError(f"the cache's teacher rows sit at other token positions than the "
                         f"data's labels for example ids {ids}: the cache was built from other "
                         f"data (for mlm: other masks, data.mask_seed or data.mlm_probability);"
                         f" rebuild it with `kdscale cache` for this data")

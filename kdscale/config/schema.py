"""The experiment's settings as typed dataclasses: every key, its type and its default.

A config file mirrors `Config` below; every key is optional. `kdscale.config` loads and
overrides them, `kdscale.config.checks` validates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kdscale.errors import KdscaleError


class ConfigError(KdscaleError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class TeacherConfig:
    """The teacher: where its weights come from, where it runs, and how the student reads it.

    `source` chooses between the logit cache and the teacher run beside the student.
    """

    model: str | None = None  # hub name or local directory to fine-tune from
    config: dict | None = None  # inline BertConfig fields: a teacher built from scratch
    tokenizer: str | None = None  # hub name or directory; default: teacher.model
    checkpoint: str | None = None  # an already fine-tuned teacher; default <output_dir>/teacher
    # Where the teacher's weights live while it runs: a full copy per process, sharded by
    # DeepSpeed ZeRO-3 (optionally offloaded to CPU memory), or chosen from its size.
    placement: Literal["auto", "replicate", "zero3", "zero3_offload"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA if able
    deepspeed_config: str | None = None  # default: the built-in configs/deepspeed/teacher_*.json
    # Where a student's teacher outputs come from: the logit cache, or the teacher itself,
    # run beside the student (needed for the hidden-state and attention losses).
    source: Literal["cache", "online"] = "cache"


@dataclass
class StudentConfig:
    """The student: the teacher layers it keeps or the model it starts from, and what trains."""

    # Teacher layers copied into the student: a list of indices, "first:K" (the classic
    # Hinton-style KD recipe of BERT distillation keeps the first 3), "every_other"
    # (DistilBERT) or "uniform:K" (K evenly spaced).
    # None: "first:3" of the teacher, or every layer of student.model.
    layers: list[int] | str | None = None
    dropout: float | None = None  # the student's hidden and attention dropout; None: teacher's
    # A pretrained student (a saved model directory) instead of the teacher's layers, e.g. a
    # general-distilled small BERT; it must share the teacher's vocabulary.
    model: str | None = None
    # Keep the token embedding matrix as it is: in a small BERT it is most of the student
    # (MiniLM-L6, 3 layers: 11.7M of 17.4M parameters), so its gradient and optimizer
    # update are a large share of each step on a CPU.
    freeze_embeddings: bool = False

    @property
    def layer_spec(self) -> list[int] | str:
        """`layers`, or its default: every layer of `model`, else the teacher's first 3."""
        if self.layers is not None:
            return self.layers
        return "all" if self.model else "first:3"


@dataclass
class AugmentConfig:
    """Noisy copies of each training row, labelled by the teacher alone (task classification).

    They give the student a bigger transfer set (kdscale.data.augment). Applied to the
    distillation's data and its cache, never to the teacher's fine-tuning or to evaluation.
    """

    copies: int = 0  # copies per training row; 0: none
    mask_prob: float = 0.1  # a word becomes the tokenizer's mask token
    replace_prob: float = 0.1  # a word becomes one drawn from the training text by frequency
    ngram_prob: float = 0.25  # the copy is cut to a random span of 1..max_ngram words
    max_ngram: int = 5
    seed: int = 0  # with the example id and copy number, draws each copy


@dataclass
class DataConfig:
    """The rows: their source, text and label columns, token length and masked-LM masks."""

    dataset: str | None = None  # hub dataset name, e.g. "glue"; or use train_file/eval_file
    subset: str | None = None  # hub dataset config, e.g. "sst2"
    train_file: str | None = None  # local csv/tsv/json/jsonl/parquet
    eval_file: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "sentence"
    text_pair_column: str | None = None  # set for sentence-pair tasks (MNLI, QQP, ...)
    label_column: str = "label"
    rename_columns: dict | None = None  # {name in file: name above}, where files differ
    max_length: int = 128
    max_train_examples: int | None = None  # keep the first N rows (quick runs)
    max_eval_examples: int | None = None
    # tasks mlm and pretraining: each example's masks (and, for pretraining, its second
    # sentence) are drawn once from (mask_seed, example id), so every rerun, process and
    # machine masks the same tokens, and the cache records the recipe.
    mlm_probability: float = 0.15
    mask_seed: int = 0
    # task question-answering: overlap (in tokens) of the windows a long context is cut into
    doc_stride: int = 128
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # In-domain text without labels, which the teacher labels in its cache: more transfer set
    # for distillation (task classification; kdscale.data.unlabelled). Read with the text
    # columns above; a label column in it is ignored. The teacher's fine-tuning never reads it.
    unlabelled_file: str | None = None
    max_unlabelled_examples: int | None = None  # keep its first N rows


@dataclass
class CacheConfig:
    """The teacher-logit cache: where it is, how `kdscale cache` stores and writes logits.

    `ensemble` instead reads several teachers' caches and averages them.
    """

    dir: str | None = None  # default <output_dir>/cache
    # Several teachers: their caches (dense), averaged in probability space with these weights
    # (default: equal). `dir` is then only where `kdscale cache` writes.
    ensemble: list[str] | None = None
    ensemble_weights: list[float] | None = None
    # Storage of the raw logits. int8 (top-k and sampled rows only): 8-bit codes on a per-row
    # grid, dequantized when read, a quarter of float32's bytes; the audit measures its error.
    # Top-k indices need no setting: they take the narrowest width the vocabulary needs.
    dtype: Literal["float16", "bfloat16", "float32", "int8"] = "float16"
    # topk: the k largest logits per row (big heads); sampled: k tokens drawn per row from the
    # teacher at loss.temperature, an unbiased estimate of the full teacher (cache.sampling)
    kind: Literal["dense", "topk", "sampled"] = "dense"
    k: int = 64
    # topk: also store each row's tail, the teacher's mass outside its k slots at
    # loss.temperature (a number, not a schedule), as one more slot of the loss: no truncation
    # bias. The cache then serves that temperature only.
    tail: bool = False
    shard_rows: int = 8192  # rows per shard file: the unit of work, of resume and of reading
    batch_size: int = 64  # teacher forward batch while caching
    overwrite: bool = False  # replace a complete cache built from another teacher or data
    # distill reads every shard once before the first step (checksums, finite values)
    verify: bool = True


@dataclass
class LossConfig:
    """The distillation loss: T and alpha of the logit term, and losses beyond logits.

    T and alpha are each a number or a schedule over the run; the hidden-state and attention
    losses, each with its weight, need the teacher run beside the student.
    """

    # A number, or a schedule over the run: {kind: linear | cosine, start: 4.0, end: 1.0}.
    temperature: float | dict = 2.0
    alpha: float | dict = 0.5  # weight of the soft (KL) term; 1 - alpha goes to hard-label CE
    # Losses beyond logits (need teacher.source: online), each with its weight:
    hidden_mse: float = 0.0  # TinyBERT: hidden states through a learned projection
    hidden_cosine: float = 0.0  # DistilBERT: cosine between hidden states (equal widths)
    attention_kl: float = 0.0  # TinyBERT/MiniLM: KL between attention distributions
    layer_map: dict | str = "uniform"  # {student layer: teacher layer}, or "uniform"


@dataclass
class TrainConfig:
    """One training command: `finetune` (the teacher) or `distill` (the student).

    Optimizer, schedule, batch, precision, checkpoints, evaluation during training and logging.
    """

    epochs: float = 3.0
    batch_size: int = 32  # per device
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # stop early (quick runs); None trains all epochs
    log_every: int = 10
    # "launch": what the launcher was told (an accelerate config's mixed_precision, or
    # --mixed_precision); "no" without a launcher. A value here wins over the launch.
    mixed_precision: Literal["launch", "no", "bf16", "fp16"] = "launch"
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None: none
    keep_checkpoints: int = 2  # the newest complete ones are kept
    eval_every: int | None = None  # optimizer steps between evaluations (best model kept)
    # Accelerate trackers ("tensorboard", "wandb", "mlflow", ...; "none"), in <output>/logs.
    report_to: list[str] | str = "tensorboard"
    # Per-phase step times (data, teacher, forward, loss, backward, optimizer); on a GPU
    # they synchronize the device at each phase boundary, so switch off for top speed.
    time_breakdown: bool = True

    @property
    def trackers(self) -> list[str]:
        """`report_to` as a list."""
        return [self.report_to] if isinstance(self.report_to, str) else self.report_to


@dataclass
class EvalConfig:
    """`kdscale eval`: batch size, longest answer span and the batches timed for latency."""

    batch_size: int = 64
    max_answer_length: int = 30  # task question-answering: longest answer span, in tokens
    latency_batches: int = 20  # timed batches per model, after warm-up


@dataclass
class Config:
    """One experiment: what every command (finetune, cache, distill, eval, env) reads.

    Built by `load_config` from a YAML file and dotted overrides, and checked before any work;
    every section and key has a default, so an empty file is a valid experiment. Sections:
    `teacher`, `student`, `data`, `cache`, `loss`, `finetune`, `distill` (both `TrainConfig`),
    `eval`. Derived paths: `teacher_dir`, `student_dir`, `cache_dir`, `student_best_dir`.
    """

    # What is distilled (kdscale.tasks): sentence classification, masked-LM ("general
    # distillation"), masked LM + next-sentence prediction (BERT's pre-training heads),
    # token classification (NER) or extractive question answering.
    task: Literal["classification", "mlm", "pretraining", "token-classification",
                  "question-answering"] = "classification"
    output_dir: str = "runs/kdscale"
    seed: int = 42
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=5e-5))
    distill: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-4))
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def teacher_dir(self) -> Path:
        """The fine-tuned teacher: `teacher.checkpoint`, else <output_dir>/teacher."""
        return Path(self.teacher.checkpoint or Path(self.output_dir) / "teacher")

    @property
    def student_dir(self) -> Path:
        """Where `kdscale distill` saves the final student."""
        return Path(self.output_dir) / "student"

    @property
    def student_best_dir(self) -> Path:
        """Where the best student of `distill.eval_every`'s evaluations is kept."""
        return Path(self.output_dir) / "student_best"

    @property
    def cache_dir(self) -> Path:
        """The logit cache: `cache.dir`, else <output_dir>/cache."""
        return Path(self.cache.dir or Path(self.output_dir) / "cache")

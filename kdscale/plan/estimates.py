"""The teacher's placement, the cache's size and the memory per device of a planned launch
(see kdscale.plan.launch)."""

from __future__ import annotations

from pathlib import Path

from kdscale import configs
from kdscale.cache.format import CacheError, read_manifest
from kdscale.cache.sizes import row_bytes
from kdscale.config import Config, DataConfig
from kdscale.plan.memory import DTYPE_BYTES, Term
from kdscale.plan.sizes import ModelSizes
from kdscale.plan.stages import (
    MemoryInputs,
    Model,
    cache_stage,
    distill_stage,
    finetune_stage,
)
from kdscale.plan.zero import ZeroSettings, zero_settings
from kdscale.tasks import get_task
from kdscale.teacher import DEEPSPEED_CONFIGS, choose_placement, teacher_source

GiB = 1024**3


def teacher_dtype(config: Config, mixed_precision: str) -> str:
    """teacher.precision; `auto` is bf16 on GPUs that have it, which a bf16 launch implies."""
    if config.teacher.precision != "auto":
        return config.teacher.precision
    return "bf16" if mixed_precision == "bf16" else "fp32"


# Where the teacher runs, by where distill reads its outputs from (teacher_source).
RUNS_IN = {"cache": "cache", "online": "cache and distill",
           "none": "no stage (a hard-label run: loss.alpha 0, no loss beyond logits; "
                   "its layers only build the student)"}
CACHE_UNREAD = {"online": "not read: the teacher runs online (teacher.source online)",
                "none": "not read: a hard-label run reads no teacher output"}


def teacher_estimate(config: Config, launch, sizes: ModelSizes,
                     device_memory: float | None) -> dict:
    dtype = teacher_dtype(config, launch.mixed_precision)
    source = teacher_source(config)
    weights = sizes.teacher_params * DTYPE_BYTES[dtype]
    requested = config.teacher.placement
    if requested == "auto" and device_memory is None:
        placement, why = "auto", ("chosen at start from the free memory per device; pass "
                                  "--device_memory_gib to see the choice now")
    else:
        chosen = choose_placement(requested, weights, int((device_memory or 0) * GiB),
                                  launch.world_size)
        placement, why = chosen.name, chosen.reason
    return {"placement": placement, "why": why, "dtype": dtype, "weights": weights,
            "deepspeed": _teacher_deepspeed(config, placement),
            "source": source, "runs_in": RUNS_IN[source]}


def _teacher_deepspeed(config: Config, placement: str) -> str:
    if placement == "replicate":
        return "none (a full copy on every device)"
    if placement == "auto":
        return "none or ZeRO-3, with the placement"
    built_in = f"configs/{DEEPSPEED_CONFIGS[placement]}"
    return f"ZeRO-3 ({config.teacher.deepspeed_config or built_in})"


def cache_estimate(config: Config, sizes: ModelSizes) -> dict:
    directory = config.cache_dir
    source = teacher_source(config)
    if source != "cache":
        return {"dir": str(directory), "read": False, "why": CACHE_UNREAD[source]}
    try:
        manifest = read_manifest(directory)
    except (CacheError, FileNotFoundError, OSError):
        manifest = None
    if manifest is not None:
        on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        return {"dir": str(directory), "read": True, "written": True,
                "examples": manifest.num_examples, "kind": manifest.kind,
                "dtype": manifest.dtype, "bytes": on_disk}
    examples = transfer_set_rows(config.data)
    row = bytes_per_row(config, sizes) * rows_per_example(config)
    kind = "topk per position" if get_task(config.task).per_position else \
        "dense" if config.task == "question-answering" else config.cache.kind
    return {"dir": str(directory), "read": True, "written": False, "examples": examples,
            "kind": kind, "dtype": config.cache.dtype, "bytes_per_row": row,
            "bytes": row * examples if examples else None}


def transfer_set_rows(data: DataConfig) -> int | None:
    """The examples distillation's cache holds: the training rows, each augmented copy, and
    the unlabelled rows; None where a count is unknown (a hub dataset)."""
    examples = data.max_train_examples or count_rows(data.train_file)
    if not examples:
        return examples
    examples *= 1 + data.augment.copies  # an augmented copy is an example of its own
    if data.unlabelled_file is None:
        return examples
    unlabelled = count_rows(data.unlabelled_file)
    if unlabelled is None:
        return None
    return examples + min(unlabelled, data.max_unlabelled_examples or unlabelled)


def bytes_per_row(config: Config, sizes: ModelSizes) -> int:
    cache, tail = config.cache, config.cache.tail
    if config.task in ("mlm", "pretraining"):  # top-k, plus each row's place and example id
        return row_bytes(kind="topk", num_outputs=sizes.vocab_size, k=cache.k, dtype=cache.dtype,
                         per_position=True, tail=tail)
    if config.task == "token-classification":  # every tag, at each word start
        return row_bytes(kind="topk", num_outputs=sizes.num_labels, k=sizes.num_labels,
                         dtype=cache.dtype, per_position=True)
    if config.task == "question-answering":  # a start and an end logit per position
        return row_bytes(kind="dense", num_outputs=2 * config.data.max_length, k=None,
                         dtype=cache.dtype)
    if cache.kind in ("topk", "sampled"):  # a sampled row: k slots, as a top-k one
        return row_bytes(kind="topk", num_outputs=sizes.num_labels, k=cache.k,
                         dtype=cache.dtype, tail=tail)
    return row_bytes(kind="dense", num_outputs=sizes.num_labels, k=None, dtype=cache.dtype)


def rows_per_example(config: Config) -> int:
    """Cached rows per example, at most: the masked positions or word starts of a
    full-length example (shorter ones have fewer), one otherwise."""
    tokens = config.data.max_length - 2  # [CLS] and [SEP] are never rows
    if config.task in ("mlm", "pretraining"):  # pretraining: one more, the next-sentence row
        masked = max(1, round(config.data.mlm_probability * tokens))
        return masked + (config.task == "pretraining")
    return tokens if config.task == "token-classification" else 1


def count_rows(path: str | None) -> int | None:
    """Rows of a local line-oriented data file (header excluded); None when unknown."""
    if not path or not Path(path).is_file():
        return None
    suffix = Path(path).suffix
    if suffix not in (".csv", ".tsv", ".jsonl", ".txt"):
        return None
    with open(path, "rb") as file:
        lines = sum(1 for line in file if line.strip())
    return lines - (suffix in (".csv", ".tsv"))


def memory_inputs(config: Config, launch, sizes: ModelSizes, zeros: dict[str, ZeroSettings],
                  teacher: dict, precisions: dict[str, str], device: str) -> MemoryInputs:
    """The numbers the memory model reads. An unresolved `auto` placement is counted as a
    replica (the larger of the two a device that fits it gets)."""
    placement = "replicate" if teacher["placement"] == "auto" else teacher["placement"]
    vocab = sizes.vocab_size
    return MemoryInputs(
        device=device, world=launch.world_size, max_length=config.data.max_length,
        teacher=Model(sizes.teacher_params, sizes.teacher_layers, sizes.teacher_hidden,
                      sizes.teacher_heads, vocab),
        student=Model(sizes.student_params, sizes.student_layers, sizes.student_hidden,
                      sizes.student_heads, vocab),
        teacher_dtype=teacher["dtype"], placement=placement, source=teacher["source"],
        teacher_zero=teacher_zero_settings(placement, sizes.teacher_hidden,
                                           config.teacher.deepspeed_config),
        finetune_zero=zeros["finetune"], student_zero=zeros["distill"],
        finetune_precision=precisions["finetune"], distill_precision=precisions["distill"],
        cache_batch=config.cache.batch_size, finetune_batch=config.finetune.batch_size,
        distill_batch=config.distill.batch_size)


def teacher_zero_settings(placement: str, hidden: int,
                          deepspeed_config: str | None = None) -> ZeroSettings:
    """The teacher engine's settings (its own JSON, or kdscale's for the placement), its
    "auto" values filled as the runner fills them."""
    if placement not in DEEPSPEED_CONFIGS:
        return ZeroSettings()
    return zero_settings(deepspeed_config or configs.path(DEEPSPEED_CONFIGS[placement]), hidden)


def memory_estimate(inputs: MemoryInputs, runtime: Term) -> dict:
    """Bytes per process of each stage, term by term, and each stage's peak."""
    return {"device": inputs.device, "runtime": runtime.to_dict(),
            "cache": cache_stage(inputs, runtime),
            "finetune": finetune_stage(inputs, runtime),
            "distill": distill_stage(inputs, runtime)}

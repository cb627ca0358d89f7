"""Memory per process of each stage, term by term: `kdscale cache` (the teacher's forward),
`kdscale finetune` (the teacher trained) and `kdscale distill` (the student trained, an
online teacher beside it). Everything comes from MemoryInputs, a flat record of numbers,
so a plan recorded as JSON can be re-derived later (benchmarks/scale/report.py does)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kdscale.plan.memory import (
    DTYPE_BYTES,
    Term,
    activation_bytes,
    device_total,
    gathered_for_training,
    inference_activation_bytes,
    offloaded,
    plain_training_terms,
    zero_training_terms,
)
from kdscale.plan.zero import ZeroSettings

# A ZeRO-3 teacher's forward holds 0.55 GiB more with the prefetch bucket (0.9 h^2) than
# without: 44% of BERT-large's 1.25 GiB of fp32 weights (2 CPU processes, DeepSpeed 0.19).
PREFETCH_AHEAD_SHARE = 0.44


@dataclass(frozen=True)
class Model:
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int

    @property
    def largest(self) -> int:
        """Elements of the largest tensor, the word embeddings."""
        return self.vocab * self.hidden


@dataclass(frozen=True)
class MemoryInputs:
    device: str  # cpu | gpu
    world: int
    max_length: int
    teacher: Model
    student: Model
    teacher_dtype: str  # of the cache's forward and the online teacher
    placement: str  # replicate | zero3 | zero3_offload
    source: str  # cache | online | none: where distill reads teacher outputs
    teacher_zero: ZeroSettings  # the teacher's own engine (teacher_zero3*.json)
    finetune_zero: ZeroSettings
    student_zero: ZeroSettings
    finetune_precision: str  # no | bf16 | fp16
    distill_precision: str
    cache_batch: int
    finetune_batch: int
    distill_batch: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> MemoryInputs:
        models = {k: Model(**raw[k]) for k in ("teacher", "student")}
        zeros = {k: ZeroSettings(**raw[k]) for k in ("teacher_zero", "finetune_zero",
                                                     "student_zero")}
        return cls(**{**raw, **models, **zeros})


def stage_dict(terms: list[Term], load: list[Term] | None = None,
               save: list[Term] | None = None) -> dict:
    """A stage's terms and its peak: the largest of its run, its load (models read before
    the run's state exists) and its save (the end, on the main process)."""
    phases = [terms, load or [], save or []]
    return {"terms": [t.to_dict() for t in terms],
            "load_terms": [t.to_dict() for t in load or []],
            "save_terms": [t.to_dict() for t in save or []],
            "total": max(device_total(phase) for phase in phases)}


def cache_stage(m: MemoryInputs, runtime: Term) -> dict:
    return stage_dict([runtime, *teacher_forward_terms(m, m.cache_batch)],
                      teacher_load_terms(m, runtime))


def teacher_load_terms(m: MemoryInputs, runtime: Term) -> list[Term] | None:
    """A ZeRO-3 teacher's load on a CPU: the main process reads the whole checkpoint
    (memory-mapped, so its pages count as resident while it scatters the partitions) beside
    its own shard; the other processes only receive their shards. Measured: the main
    process's file-backed pages were 0.95 GiB larger than the other's for BERT-large's 1.25.
    On a GPU the checkpoint is read in host memory."""
    if m.device == "gpu" or m.placement not in ("zero3", "zero3_offload"):
        return None
    return [runtime, teacher_shard(m),
            checkpoint_read_whole(m.teacher, "by the main process to scatter the partitions")]


def teacher_shard(m: MemoryInputs) -> Term:
    t, w = m.teacher, DTYPE_BYTES[m.teacher_dtype]
    return Term("teacher shard", t.params * w / m.world,
                f"{t.params / 1e6:.1f}M x {w} B / {m.world} processes")


def checkpoint_read_whole(teacher: Model, purpose: str) -> Term:
    """A saved teacher read whole: fp32 on disk, its memory-mapped pages resident."""
    return Term("teacher checkpoint", 4 * teacher.params, f"{teacher.params / 1e6:.1f}M x 4 B, "
                f"read whole (memory-mapped pages) {purpose}")


def finetune_stage(m: MemoryInputs, runtime: Term) -> dict:
    terms = [runtime, *training_terms(m.teacher, m.finetune_precision, m.finetune_zero, m,
                                      m.finetune_batch)]
    return stage_dict(terms, save=save_terms(terms, m.teacher, m.finetune_precision,
                                             m.finetune_zero, m.device))


def distill_stage(m: MemoryInputs, runtime: Term) -> dict:
    terms = [runtime, *training_terms(m.student, m.distill_precision, m.student_zero, m,
                                      m.distill_batch)]
    if m.source == "online":
        terms += [Term(f"online teacher: {t.name}", t.bytes, t.why, t.where)
                  for t in teacher_forward_terms(m, m.distill_batch)]
    save = save_terms(terms, m.student, m.distill_precision, m.student_zero, m.device)
    return stage_dict(terms, student_build_terms(m, runtime), save)


def save_terms(run: list[Term], model: Model, precision: str, zero: ZeroSettings,
               device: str) -> list[Term] | None:
    """The end of a run on the main process: the training state still held, the steps'
    activations and gathered weights gone, and in CPU memory a full copy of the weights
    (gathered from the ZeRO-3 partitions) plus the copy safetensors makes of each tensor
    while it writes. On a GPU these copies are in host memory."""
    if device == "gpu":
        return None
    w, n = DTYPE_BYTES[precision], f"{model.params / 1e6:.1f}M"
    kept = [t for t in run if t.name not in ("activations", "gathered weights")]
    copies = [Term("serialized copy", w * model.params, f"{n} x {w} B: safetensors copies "
                   "each tensor while it writes the model")]
    if zero.stage == 3:
        copies.insert(0, Term("weights gathered to save", w * model.params,
                              f"{n} x {w} B: the ZeRO-3 partitions gathered on the main process"))
    return kept + copies


def training_terms(model: Model, precision: str, zero: ZeroSettings, m: MemoryInputs,
                   batch: int) -> list[Term]:
    if zero.stage == 0:
        terms = plain_training_terms(model.params, m.world)
    else:
        terms = zero_training_terms(model.params, precision, zero, m.world, m.device)
    if zero.stage == 3:
        terms.append(gathered_for_training(model.params, precision, zero, model.largest))
    acts = activation_bytes(batch, m.max_length, model.hidden, model.heads, model.layers,
                            precision)
    terms.append(Term("activations", acts, f"{model.layers} layers x batch {batch} x "
                      f"{m.max_length} tokens, kept for backward (Korthikanti et al.)"))
    return terms


def teacher_forward_terms(m: MemoryInputs, batch: int) -> list[Term]:
    t, w = m.teacher, DTYPE_BYTES[m.teacher_dtype]
    acts = Term("activations", inference_activation_bytes(batch, m.max_length, t.hidden,
                                                          t.heads, m.teacher_dtype),
                f"one layer at a time under no_grad, batch {batch} x {m.max_length} tokens")
    if m.placement not in ("zero3", "zero3_offload"):
        return [Term("teacher weights", t.params * w, f"{t.params / 1e6:.1f}M x {w} B, a "
                     f"full copy ({m.placement})"), acts]
    shard = teacher_shard(m)
    copies = 2 if m.device == "cpu" else 1  # gloo gathers into a flat copy, then the tensor
    gathered = Term("gathered layer", copies * t.largest * w,
                    f"the largest tensor ({t.largest / 1e6:.1f}M) gathered for its forward"
                    + (", twice on a CPU (gloo's copy)" if copies == 2 else ""))
    terms = [offloaded(shard, m.placement == "zero3_offload", m.device), gathered]
    if m.teacher_zero.prefetch_bucket:
        terms.append(Term("prefetched layers", PREFETCH_AHEAD_SHARE * t.params * w,
                          f"{PREFETCH_AHEAD_SHARE:.0%} of the weights: the prefetcher asks "
                          f"for stage3_prefetch_bucket_size "
                          f"{m.teacher_zero.prefetch_bucket:,} elements more at every "
                          f"submodule and runs layers ahead (measured, BERT-large)"))
    return [*terms, acts]


def student_build_terms(m: MemoryInputs, runtime: Term) -> list[Term] | None:
    """distill reads the whole fine-tuned teacher to copy the student's layers out of it,
    before the student's training state exists. On a GPU that happens in CPU memory."""
    if m.device == "gpu":
        return None
    s = m.student
    return [runtime, checkpoint_read_whole(m.teacher, "to build the student"),
            Term("student copy", 4 * s.params, f"{s.params / 1e6:.1f}M x 4 B, before "
                 "DeepSpeed partitions it")]

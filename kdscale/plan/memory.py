"""Bytes per process, term by term, estimated from parameter counts, shapes and the ZeRO
settings before anything is loaded, for `kdscale env`. Each term names what it holds and
says how it is counted, so a user reads which part is which.

Training state (DeepSpeed's ZeRO optimizers, deepspeed/runtime/zero/, with Adam): weights in
the training dtype (w = 2 B in 16-bit, 4 B in fp32); an fp32 master copy of this process's
partition (kept even when training in fp32); Adam's two fp32 moments; gradients; and the
reduce buckets gradients are copied into before each reduction. ZeRO-1 splits the master
copy and moments over N processes, ZeRO-2 also the gradients, ZeRO-3 also the weights.
Without DeepSpeed, PyTorch's AdamW updates fp32 weights in place (no master copy).

Device: on a GPU a buffer costs its full size when allocated; on a CPU only the pages
written count, so a bucket costs at most the gradients that pass through it, and "offload"
to CPU memory moves nothing (it is the same memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kdscale.plan.zero import ZeroSettings

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "no": 4}
MiB, GiB = 1024**2, 1024**3


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    why: str  # how it is counted, with the numbers
    where: str = "device"  # or "host": offloaded to CPU memory while the device is a GPU

    def to_dict(self) -> dict:
        return asdict(self)


def device_total(terms: list[Term]) -> float:
    return sum(t.bytes for t in terms if t.where == "device")


def _m(params: float) -> str:
    return f"{params / 1e6:.1f}M"


def offloaded(term: Term, offload: bool, device: str) -> Term:
    """An offloaded term lives in host memory: elsewhere on a GPU, the same RAM on a CPU."""
    if not offload:
        return term
    if device == "gpu":
        return Term(term.name, term.bytes, term.why + "; offloaded to CPU memory", "host")
    return Term(term.name, term.bytes, term.why + "; offloaded, but on a CPU that is the "
                "same memory")


def touched(elements: float, flowing: float, device: str) -> float:
    """Elements of a buffer that cost memory: all on a GPU, the written ones on a CPU."""
    return elements if device == "gpu" else min(elements, flowing)


def plain_training_terms(params: int, world: int) -> list[Term]:
    """No DeepSpeed: fp32 weights (autocast computes in 16 bits from them), PyTorch AdamW."""
    n = _m(params)
    terms = [Term("weights", 4 * params, f"{n} x 4 B (fp32; autocast keeps fp32 weights)"),
             Term("gradients", 4 * params, f"{n} x 4 B"),
             Term("Adam moments", 8 * params, f"{n} x 8 B (two fp32 moments)")]
    if world > 1:
        terms.append(Term("DDP buckets", 4 * params, f"{n} x 4 B: DDP copies every gradient "
                          "into its all-reduce buckets"))
    return terms


def zero_training_terms(params: int, precision: str, zero: ZeroSettings, world: int,
                        device: str) -> list[Term]:
    """The student's (or fine-tuned teacher's) state under DeepSpeed ZeRO-1/2/3."""
    w, n, s = DTYPE_BYTES[precision], _m(params), zero.stage
    part = params / world  # this process's partition
    weights = Term("weights", w * params / (world if s == 3 else 1),
                   f"{n} x {w} B" + (f" / {world} processes (ZeRO-3 partition)" if s == 3 else ""))
    terms = [offloaded(weights, zero.offload_params and s == 3, device),
             offloaded(Term("fp32 master weights", 4 * part,
                            f"{n} x 4 B / {world}: DeepSpeed's fp32 copy of this partition"),
                       zero.offload_optimizer, device),
             offloaded(Term("Adam moments", 8 * part, f"{n} x 8 B / {world}"),
                       zero.offload_optimizer, device)]
    terms += gradient_terms(params, w, zero, world, device)
    return terms


def gradient_terms(params: int, w: int, zero: ZeroSettings, world: int,
                   device: str) -> list[Term]:
    n, s, part = _m(params), zero.stage, params / world
    if s == 1:
        grads = [Term("gradients", w * params, f"{n} x {w} B: ZeRO-1 keeps every gradient"),
                 Term("fp32 gradient partition", 4 * part, f"{n} x 4 B / {world}: what the "
                      f"optimizer steps on")]
    elif s == 2:
        grads = [Term("gradient partition", 4 * part, f"{n} x 4 B / {world} (fp32)")]
    else:
        grads = [Term("gradient partitions", 8 * part, f"{n} x 4 B / {world}, twice: the "
                      "fp32 partition gradients are reduced into, and the one the optimizer "
                      "steps on")]
    return grads + bucket_terms(params, w, zero, device)


def bucket_terms(params: int, w: int, zero: ZeroSettings, device: str) -> list[Term]:
    """Reduce buckets: ZeRO-1 accumulates in fp32, ZeRO-2/3 in the training dtype; ZeRO-1/2
    keep two with overlap_comm, ZeRO-3 one."""
    if not zero.contiguous_gradients:
        return []
    count = 2 if zero.overlap_comm and zero.stage < 3 else 1
    b = 4 if zero.stage == 1 else w
    elements = touched(zero.reduce_bucket, params, device)
    how = "allocated whole on a GPU" if device == "gpu" else \
        "on a CPU only the written part: at most every gradient"
    return [Term("reduce buckets", count * elements * b,
                 f"{count} x reduce_bucket_size {zero.reduce_bucket:,.0f} elements x {b} B "
                 f"({how})")]


def gathered_for_training(params: int, precision: str, zero: ZeroSettings,
                          largest: int) -> Term:
    """ZeRO-3 frees a gathered weight after its forward only when it is not reused within
    stage3_max_reuse_distance elements; backward reuses layer i after about twice the
    parameters that follow it, so a distance at or above 2P keeps every weight live from its
    forward to its backward (up to stage3_max_live_parameters)."""
    w = DTYPE_BYTES[precision]
    kept = min(params, zero.max_live_parameters,
               max(zero.max_reuse_distance / 2, largest + zero.prefetch_bucket))
    return Term("gathered weights", kept * w,
                f"{_m(kept)} x {w} B: layers gathered for forward stay until backward "
                f"(stage3_max_reuse_distance {zero.max_reuse_distance:,.0f}, "
                f"stage3_max_live_parameters {zero.max_live_parameters:,.0f})")


def activation_bytes(batch: int, seq: int, hidden: int, heads: int, layers: int,
                     precision: str) -> float:
    """Activations a transformer encoder keeps for backward: per layer about
    s*b*h*(34 + 5*a*s/h) bytes in 16-bit (Korthikanti et al., 2022, no recomputation);
    fp32 keeps twice that."""
    per_layer = seq * batch * hidden * (34 + 5 * heads * seq / hidden)
    return layers * per_layer * DTYPE_BYTES[precision] / 2


def inference_activation_bytes(batch: int, seq: int, hidden: int, heads: int,
                               dtype: str) -> float:
    """Under no_grad one layer's tensors live at a time: its input and output, the query,
    key and value, the 4h feed-forward, and two attention score matrices."""
    return DTYPE_BYTES[dtype] * batch * seq * (10 * hidden + 2 * heads * seq)

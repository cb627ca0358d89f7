"""Losses beyond logits, for distilling beside an online teacher: hidden states (TinyBERT's
projected MSE, DistilBERT's cosine) and attention distributions (TinyBERT/MiniLM's KL).

Inputs are Hugging Face outputs run with `output_hidden_states=True`, and for the attention
loss `output_attentions=True` under `attn_implementation="eager"` (SDPA and flash attention
return no probabilities). Indexing follows HF: `hidden_states[0]` is the embedding output,
`hidden_states[i + 1]` the output of transformer layer i, `attentions[i]` layer i's
(B, heads, S, S) probabilities. A layer map speaks of transformer layers 0..L-1;
`embeddings=True` adds the pair (embeddings -> embeddings) to the hidden-state losses.

Every loss runs in (at least) fp32, averages over valid tokens (attention_mask != 0), never
over padding, and is 0 with a zero gradient (never NaN) when no token is valid. Teacher
tensors are detached: gradient reaches the student and the projections only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdscale.config.intermediate import WEIGHTS, IntermediateConfig
from kdscale.errors import KdscaleError

# Student attention probabilities are clamped here before the log: a student probability that
# underflowed to 0 where the teacher has mass would give log(0) = -inf and NaN gradients.
# Such an element costs a large finite -log(1e-12) ~ 27.6 and passes no gradient.
PROB_EPS = 1e-12


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer i -> teacher layer round((i + 1) * Lt / Ls) - 1: every k-th teacher layer,
    the last student layer on the last teacher layer (TinyBERT's g(m) = k * m)."""
    if not 0 < student_layers <= teacher_layers:
        raise KdscaleError(f"layer_map: 'uniform' needs 1 <= student layers <= teacher layers, "
                           f"got {student_layers} student and {teacher_layers} teacher layers; "
                           f"give an explicit {{student layer: teacher layer}} mapping")
    # Integer round-half-up: Python's round() sends halves to even, so 12 -> 8 would space
    # the chosen layers unevenly (gaps 1,1,2,2,1,1,2 instead of 1,2,1,2,...).
    ls, lt = student_layers, teacher_layers
    return {i: ((i + 1) * 2 * lt + ls) // (2 * ls) - 1 for i in range(ls)}


def parse_layer_map(spec: dict | str, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """A config's `layer_map` ("uniform" or {student layer: teacher layer}) as checked ints,
    sorted by student layer. String keys are accepted: JSON and CLI overrides give them."""
    if spec == "uniform":
        return uniform_layer_map(student_layers, teacher_layers)
    if not isinstance(spec, dict) or not spec:
        raise KdscaleError(f"layer_map: expected 'uniform' or a non-empty mapping "
                           f"{{student layer: teacher layer}}, got {spec!r}")
    pairs = {_layer_index(s, "student", student_layers): _layer_index(t, "teacher", teacher_layers)
             for s, t in spec.items()}
    if len(pairs) != len(spec):
        raise KdscaleError(f"layer_map: a student layer appears twice in {spec!r}")
    return dict(sorted(pairs.items()))


def _layer_index(value: object, who: str, count: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise KdscaleError(f"layer_map: {who} layer {value!r} is not in the {who}, which has "
                           f"layers 0..{count - 1}")
    return value


def check_same_width(student_hidden: int, teacher_hidden: int) -> None:
    if student_hidden != teacher_hidden:
        raise KdscaleError(f"hidden_cosine needs equal hidden sizes, got student {student_hidden} "
                           f"and teacher {teacher_hidden}; use hidden_mse, which learns a "
                           f"projection between them")


class HiddenStateMSE(nn.Module):
    """TinyBERT's hidden-state loss: mean over mapped layers of the per-feature MSE between
    W_s h_s and h_t on valid tokens, W_s: d_student -> d_teacher learned (absent when equal).

    One projection per mapped layer: each depth's residual stream has its own basis and scale,
    and d_s * d_t weights per layer (dropped after distillation) are cheap. The TinyBERT paper
    shares one W_h over layers, a tighter constraint. Give this module's parameters to the
    student's optimizer: the projections train with it.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, layer_map: dict[int, int],
                 embeddings: bool = False):
        super().__init__()
        self.pairs = _hidden_pairs(layer_map, embeddings)
        self.projections = None
        if student_hidden != teacher_hidden:
            self.projections = nn.ModuleDict(
                {name: nn.Linear(student_hidden, teacher_hidden) for name, _, _ in self.pairs})

    def forward(self, student_hidden_states: Sequence[torch.Tensor],
                teacher_hidden_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for name, s, t in self.pairs:
            h_s = _pick(student_hidden_states, s, "student", "hidden_states")  # (B, S, d_s)
            h_t = _fp32(_pick(teacher_hidden_states, t, "teacher", "hidden_states").detach())
            if self.projections is not None:
                proj = self.projections[name]
                h_s = proj(h_s.to(proj.weight.dtype))  # (B, S, d_t)
            _check_shapes(h_s, h_t, "hidden state", name)
            per_token = (_fp32(h_s) - h_t).pow(2).mean(-1)  # (B, S); mean: scale-free in d_t
            losses.append(_masked_mean(per_token, _valid(attention_mask, h_t)))
        return torch.stack(losses).mean()


class HiddenStateCosine(nn.Module):
    """DistilBERT's cosine embedding loss: mean of (1 - cos(h_s, h_t)) over valid tokens and
    mapped layers. DistilBERT itself aligns the last layer only: layer_map {Ls-1: Lt-1}."""

    def __init__(self, layer_map: dict[int, int], embeddings: bool = False):
        super().__init__()
        self.pairs = _hidden_pairs(layer_map, embeddings)

    def forward(self, student_hidden_states: Sequence[torch.Tensor],
                teacher_hidden_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for name, s, t in self.pairs:
            h_s = _fp32(_pick(student_hidden_states, s, "student", "hidden_states"))  # (B, S, d)
            h_t = _fp32(_pick(teacher_hidden_states, t, "teacher", "hidden_states").detach())
            check_same_width(h_s.shape[-1], h_t.shape[-1])
            _check_shapes(h_s, h_t, "hidden state", name)
            cos = torch.cosine_similarity(h_s, h_t, dim=-1)  # (B, S)
            losses.append(_masked_mean(1.0 - cos, _valid(attention_mask, h_t)))
        return torch.stack(losses).mean()


class AttentionKL(nn.Module):
    """KL(teacher || student) between attention distributions, per head and query row, over
    valid keys; mean over mapped layers, heads and valid query rows. Teacher zeros contribute
    0 (xlogy), student probabilities are clamped at PROB_EPS before the log."""

    def __init__(self, layer_map: dict[int, int]):
        super().__init__()
        self.layer_map = dict(layer_map)

    def forward(self, student_attentions: Sequence[torch.Tensor],
                teacher_attentions: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for s, t in self.layer_map.items():
            a_s = _fp32(_pick(student_attentions, s, "student", "attentions"))  # (B, H, S, S)
            a_t = _fp32(_pick(teacher_attentions, t, "teacher", "attentions").detach())
            if a_s.shape[1] != a_t.shape[1]:
                raise KdscaleError(f"attention_kl needs equal head counts, got student layer {s} "
                                   f"with {a_s.shape[1]} heads and teacher layer {t} with "
                                   f"{a_t.shape[1]}")
            _check_shapes(a_s, a_t, "attention", f"layer {s}")
            valid = _valid(attention_mask, a_t[:, 0])  # (B, S)
            kl = torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(PROB_EPS).log()  # (B, H, Sq, Sk)
            kl = torch.where(valid[:, None, None, :], kl, 0.0).sum(-1)  # (B, H, Sq): valid keys
            losses.append(_masked_mean(kl, valid[:, None, :].expand_as(kl)))
        return torch.stack(losses).mean()






class IntermediateLosses(nn.Module):
    """The weighted sum of the intermediate losses whose weight is > 0 (the others are never
    built nor computed, so their outputs may be absent). forward returns the unweighted parts
    by name and "total" = sum(weight * part)."""

    def __init__(self, config: IntermediateConfig, *, student_layers: int, teacher_layers: int,
                 student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.config = config
        self.layer_map = parse_layer_map(config.layer_map, student_layers, teacher_layers)
        self.losses = nn.ModuleDict()
        if config.hidden_mse > 0:
            self.losses["hidden_mse"] = HiddenStateMSE(
                student_hidden, teacher_hidden, self.layer_map, config.embeddings)
        if config.hidden_cosine > 0:
            check_same_width(student_hidden, teacher_hidden)  # fail at start, not at step 1
            self.losses["hidden_cosine"] = HiddenStateCosine(self.layer_map, config.embeddings)
        if config.attention_kl > 0:
            self.losses["attention_kl"] = AttentionKL(self.layer_map)

    @classmethod
    def from_models(cls, config: IntermediateConfig, student: nn.Module,
                    teacher: nn.Module) -> IntermediateLosses:
        s, t = student.config, teacher.config  # HF configs (DistilBERT maps n_layers, dim)
        return cls(config, student_layers=s.num_hidden_layers, teacher_layers=t.num_hidden_layers,
                   student_hidden=s.hidden_size, teacher_hidden=t.hidden_size)

    def forward(self, student_outputs, teacher_outputs,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = {}
        for name, loss in self.losses.items():
            field = "attentions" if name == "attention_kl" else "hidden_states"
            parts[name] = loss(getattr(student_outputs, field, None),
                               getattr(teacher_outputs, field, None), attention_mask)
        total = sum(getattr(self.config, name) * part for name, part in parts.items())
        if not parts:
            device = attention_mask.device if attention_mask is not None else None
            total = torch.zeros((), device=device)
        return {**parts, "total": total}

    def extra_repr(self) -> str:
        weights = ", ".join(f"{n}={getattr(self.config, n)}" for n in WEIGHTS)
        return f"{weights}, layer_map={self.layer_map}, embeddings={self.config.embeddings}"


def _hidden_pairs(layer_map: dict[int, int], embeddings: bool) -> list[tuple[str, int, int]]:
    """(name, student index, teacher index) into HF hidden_states: transformer layer i is i+1."""
    pairs = [(f"layer_{s}", s + 1, t + 1) for s, t in layer_map.items()]
    return [("embeddings", 0, 0), *pairs] if embeddings else pairs


def _pick(states: Sequence[torch.Tensor] | None, index: int, who: str,
          field: str) -> torch.Tensor:
    if not states:  # None, or () as HF returns for attentions under SDPA/flash attention
        how = ("output_attentions=True and attn_implementation='eager'"
               if field == "attentions" else "output_hidden_states=True")
        raise KdscaleError(f"the {who}'s {field} are missing: run the {who} with {how}")
    if index >= len(states):
        raise KdscaleError(f"the layer map needs {who} {field}[{index}], but the {who}'s output "
                           f"has {len(states)}; was the layer map built for another model?")
    return states[index]


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, what: str, where: str) -> None:
    if student.shape != teacher.shape:
        raise KdscaleError(f"{what} shapes differ at {where}: student {tuple(student.shape)}, "
                           f"teacher {tuple(teacher.shape)}")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 squared errors and logs lose too much; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _valid(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the tokens that count; all of them without a mask."""
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if attention_mask.shape != like.shape[:2]:
        raise KdscaleError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                           f"(batch, seq) = {tuple(like.shape[:2])}")
    return attention_mask.to(like.device) != 0


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # where, not multiply: padded positions may hold anything, and 0 * inf would be NaN
    total = torch.where(valid, values, 0.0).sum()
    return total / valid.sum().clamp_min(1)

"""8-bit teacher values (cache.dtype int8): each top-k row as int8 codes on its own grid.

A row's valid values (slots whose index is not padding) span [lo, hi]. They are stored as
codes q in [-127, 127] with a float16 offset c and scale s per row:

    c = fp16((hi + lo) / 2)        s = max(hi - c, c - lo) / 127, rounded up to a float16
    q = round((v - c) / s)         v' = c + s * q,   |v' - v| <= s / 2

The bound holds for the stored c and s (s is rounded up, never down, so no code clips), and
s <= ((hi - lo) / 2 + |hi + lo| / 2 * 2^-11) / 127 * (1 + 2^-10): about (hi - lo) / 254, a
little more where a row's span is tiny against its offset (c's float16 rounding).
The raw logits are quantized, not probabilities at one temperature, so the temperature stays
a distill-time choice; softmax ignores a row's constant shift, so c's own rounding changes
no loss. Padding slots hold -128, which dequantizes below every valid value of its row.
Sorted top-k logits of a masked-LM teacher span about 10 to 20 nats, so a step is a few
hundredths of a logit; `kdscale.cache.audit` measures what that costs the loss.
"""

from __future__ import annotations

import torch

from kdscale.cache.format import DTYPES

CODE_MAX = 127
PAD_CODE = -128
SMALLEST_SCALE = 2.0**-24  # the smallest float16 above 0: a row of equal values


def quantize_rows(values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """values [R, k] (float), valid [R, k] (bool: not a padding slot) -> the shard tensors
    `values` int8 [R, k], `values_offset` float16 [R], `values_scale` float16 [R]."""
    v = values.float()
    hi = torch.where(valid, v, -torch.inf).amax(dim=1)  # [R]
    lo = torch.where(valid, v, torch.inf).amin(dim=1)
    empty = ~valid.any(dim=1)  # a row of padding alone: any grid will do
    hi, lo = hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)
    offset = ((hi + lo) / 2).half()
    c = offset.float()
    scale = _round_up_half(torch.maximum(hi - c, c - lo).clamp(min=0) / CODE_MAX)
    codes = torch.round((v - c[:, None]) / scale.float()[:, None]).clamp(-CODE_MAX, CODE_MAX)
    codes = torch.where(valid, codes, PAD_CODE).to(torch.int8)
    return {"values": codes.contiguous(), "values_offset": offset.contiguous(),
            "values_scale": scale.contiguous()}


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """float32 [R] >= 0 -> the smallest float16 >= each (at least SMALLEST_SCALE)."""
    x = x.clamp(min=SMALLEST_SCALE)
    half = x.half()
    below = half.float() < x
    # One step up: a positive float16's bits, read as an integer, count up with its value.
    stepped = (half.view(torch.int16) + 1).view(torch.float16)
    return torch.where(below, stepped, half)


def dequantize_rows(codes: torch.Tensor, offset: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """codes int8 [R, k], offset and scale float16 [R] -> values float32 [R, k]."""
    return offset.float()[:, None] + scale.float()[:, None] * codes.float()


def stored_values(values: torch.Tensor, valid: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a reader gets back for `values` [R, k] stored as `dtype`, as float32: the
    rounding of a float dtype, or int8's codes dequantized (padding slots are arbitrary)."""
    if dtype != "int8":
        return values.to(DTYPES[dtype][0]).float()
    stored = quantize_rows(values, valid)
    return dequantize_rows(stored["values"], stored["values_offset"], stored["values_scale"])

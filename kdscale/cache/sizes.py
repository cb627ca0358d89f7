"""How wide each stored number of a cache is, and so how many bytes a row takes.

Top-k indices are stored in the narrowest unsigned width the teacher's outputs need, with
its largest value kept for the padding slot: uint16 up to 65,535 outputs (BERT's 30,522 ids
need 15 bits), int32 beyond. Whole 16-bit words rather than a 15-bit stream: a row stays a
fixed number of bytes at a fixed offset, so a reader memory-maps the shard and gathers any
row directly, and widening a word to int64 is one copy, with nothing to unpack.
The width is lossless, so it is chosen automatically; the manifest records it
(`index_dtype`) because caches written before it hold int32.
"""

from __future__ import annotations

import torch

# manifest index_dtype -> (torch dtype, safetensors dtype code, the padding slot's stored id)
INDEX_DTYPES = {"uint16": (torch.uint16, "U16", 65535), "int32": (torch.int32, "I32", -1)}
# bytes of one stored value, by manifest dtype
VALUE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}
INDEX_BYTES = {"uint16": 2, "int32": 4}
ROW_SCALE_BYTES = 4  # an int8 row's float16 offset and scale
TAIL_BYTES = 4  # a float32 mass per row
EXAMPLE_ID_BYTES, POSITION_BYTES = 8, 4  # int64 id of each row; int32 position (per position)
PER_EXAMPLE_BYTES = 12  # per-position caches: each example's int64 id and int32 row count


def narrowest_index_dtype(num_outputs: int) -> str:
    """uint16 while every id and the padding sentinel 65535 fit; int32 otherwise."""
    return "uint16" if num_outputs <= INDEX_DTYPES["uint16"][2] else "int32"


def row_bytes(*, kind: str, num_outputs: int, k: int | None, dtype: str,
              index_dtype: str | None = None, per_position: bool = False,
              tail: bool = False) -> int:
    """Bytes one row adds to a shard's tensors (a per-position cache adds PER_EXAMPLE_BYTES
    per example besides, and every shard a header of a few hundred bytes)."""
    if kind == "dense":
        return EXAMPLE_ID_BYTES + num_outputs * VALUE_BYTES[dtype]
    index = INDEX_BYTES[index_dtype or narrowest_index_dtype(num_outputs)]
    return (EXAMPLE_ID_BYTES + k * (VALUE_BYTES[dtype] + index)
            + ROW_SCALE_BYTES * (dtype == "int8") + POSITION_BYTES * per_position
            + TAIL_BYTES * tail)

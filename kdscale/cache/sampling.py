"""A sampled teacher: per row, N tokens drawn from the teacher's distribution at T, with
replacement, stored as the distinct tokens and their counts (cache.kind sampled).

Drawn tokens x_1..x_N ~ p_t give p_hat = counts / N, whose mean over draws is p_t. The soft
loss's gradient w.r.t. the student's logits is linear in the teacher's distribution,
alpha * T * (q_T - p_t), so with p_hat in its place it is an unbiased estimate of the full
gradient: the estimate of random-sampling KD (Sparse Logit Sampling, ACL 2025). A top-k
teacher is biased instead, however many slots it keeps. The rows are stored in the top-k
layout with value T * log(count) at each drawn token, so that the loss's softmax(value / T)
over a row's slots is exactly counts / N, and the top-k loss and kernel read them unchanged.

Each row's draws come from its own generator, seeded by (seed, example id, position): every
process, batch size and rerun draws the same tokens for the same row.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, example_id: int, position: int) -> int:
    """A 63-bit seed from (seed, example id, position), the same on every machine."""
    digest = hashlib.blake2b(f"{seed}/{example_id}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampled_rows(logits: torch.Tensor, example_ids: torch.Tensor, positions: torch.Tensor,
                 draws: int, temperature: float, seed: int) -> dict[str, torch.Tensor]:
    """Per row of `logits` [R, V]: `values` [R, draws] (T * log count at each distinct drawn
    token, then 0 at padding: finite, so a verify pass reads the whole tensor) and `indices`
    [R, draws] (-1 at padding, which the loss leaves out)."""
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    values = torch.zeros((len(probs), draws))
    indices = torch.full((len(probs), draws), -1, dtype=torch.int32)
    generator = torch.Generator()
    for row, (example_id, position) in enumerate(zip(example_ids.tolist(), positions.tolist(),
                                                     strict=True)):
        generator.manual_seed(row_seed(seed, example_id, position))
        drawn = torch.multinomial(probs[row], draws, replacement=True, generator=generator)
        tokens, counts = drawn.unique(return_counts=True)
        values[row, : len(tokens)] = temperature * counts.float().log()
        indices[row, : len(tokens)] = tokens.int()
    return {"values": values, "indices": indices}

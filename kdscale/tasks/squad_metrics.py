"""Span decoding and the SQuAD scores: exact match and token F1 against the gold answers.

Both scores compare normalized text: lowercase, punctuation dropped, the articles a/an/the
dropped, whitespace collapsed, so "The Eiffel Tower." matches "eiffel tower". An example's
score is its best over its gold answers (SQuAD's dev split lists several per question).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in golds))


def f1_score(prediction: str, golds: list[str]) -> float:
    return max(_token_f1(normalize_answer(prediction).split(), normalize_answer(g).split())
               for g in golds)


def _token_f1(pred: list[str], gold: list[str]) -> float:
    """F1 of the bags of words. Two empty answers agree (1.0); one empty one scores 0."""
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, context: torch.Tensor,
               max_answer_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The highest-scoring valid span of each feature: start <= end, at most
    `max_answer_length` tokens, both ends on context tokens; score = start + end logit.

    Every valid (start, end) pair is scored, not only the n best starts and ends that
    SQuAD scripts usually pair up: exact, and at L = 384 a [B, L, L] table is small.
    start_logits, end_logits: [B, L]; context: [B, L] bool. Returns (starts [B], ends [B],
    scores [B]); a feature with no valid span scores -inf."""
    length = start_logits.shape[1]
    position = torch.arange(length, device=start_logits.device)
    span = position[None, :] - position[:, None]  # [L start, L end]: end - start
    allowed = (span >= 0) & (span < max_answer_length)
    valid = allowed[None] & context[:, :, None] & context[:, None, :]  # [B, L, L]
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]
    best, flat = scores.masked_fill(~valid, float("-inf")).flatten(1).max(dim=1)
    return flat // length, flat % length, best


def squad_scores(predictions: dict[int, str], golds: dict[int, list[str]]) -> dict:
    """Mean exact match and F1 over every example of `golds` (a missing prediction is "")."""
    em = [exact_match(predictions.get(i, ""), answers) for i, answers in golds.items()]
    f1 = [f1_score(predictions.get(i, ""), answers) for i, answers in golds.items()]
    n = max(len(golds), 1)
    return {"exact_match": sum(em) / n, "f1": sum(f1) / n, "examples": len(golds)}

"""Entity-level precision, recall and F1 over tag sequences, as CoNLL (conlleval) and
seqeval's default mode score NER: an entity counts as found only when its type, first word
and last word all match.

Tags are IOB2 ("B-PER", "I-PER", "O"), IOB1, or plain types ("PER"). An `I-X` that follows
"O" or another type starts a new entity, as conlleval reads IOB1, rather than being dropped;
a plain tag reads as `I-` of its type, so a run of one type is one entity.
"""

from __future__ import annotations

from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first word, last word + 1)


def split_tag(tag: str) -> tuple[str, str]:
    """("B" | "I" | "O", type)."""
    if tag == "O":
        return "O", ""
    if tag[:2] in ("B-", "I-"):
        return tag[0], tag[2:]
    return "I", tag


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one sentence's tags, in order."""
    found, current, start = [], None, 0
    for i, tag in enumerate([*tags, "O"]):  # the "O" closes an entity at the end
        prefix, kind = split_tag(tag)
        continues = prefix == "I" and kind == current
        if current is not None and not continues:
            found.append((current, start, i))
            current = None
        if prefix != "O" and not continues:
            current, start = kind, i
    return found


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged over every entity of every sentence, plus per-word accuracy."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    hits = n_gold = n_predicted = words = correct = 0
    for sentence, (want, got) in enumerate(zip(gold, predicted, strict=True)):
        if len(want) != len(got):
            raise ValueError(f"sentence {sentence}: {len(want)} gold tags but {len(got)} "
                             f"predicted")
        truth, guess = set(entities(want)), set(entities(got))
        hits += len(truth & guess)
        n_gold, n_predicted = n_gold + len(truth), n_predicted + len(guess)
        words += len(want)
        correct += sum(w == g for w, g in zip(want, got, strict=True))
    precision = hits / n_predicted if n_predicted else 0.0
    recall = hits / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "accuracy": correct / words if words else 0.0, "entities": n_gold,
            "words": words}

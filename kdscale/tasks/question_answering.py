"""Extractive question answering (SQuAD v1.1): the answer is a span of the context.

A *feature* is one window of (question, context): a context longer than max_length is cut
into windows that overlap by data.doc_stride tokens, and each window is one row of the
dataset with its own `example_id` (its running index over the split: the cache's key) and
the `source_id` of the question it came from. Its labels are the answer's start and end
token, or (0, 0), the [CLS], where the window does not hold the whole answer, as BERT does.

Label logits are [B, 2, L] (start and end logits over positions), so the loss, fine-tuning
and the cache see 2 rows per feature. The dense cache stores each feature's [2, max_length]
logits; padding is filled with PAD_LOGIT, not -inf, so an fp16 cache stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering

from kdscale.cache.format import CacheError
from kdscale.config import Config, ConfigError, DataConfig
from kdscale.data import DataError, TaskData, fingerprint, load_raw
from kdscale.tasks.base import PAD_LOGIT, CacheLayout, Task
from kdscale.tasks.squad_metrics import best_spans, squad_scores

NOT_CONTEXT = [-1, -1]  # the offsets kept for question, special and padding tokens


@dataclass
class QAData(TaskData):
    """Features, plus what decoding needs: each source example's context and gold answers
    (columns example_id, context, answers) and the longest answer, in tokens."""
    examples: datasets.Dataset | None = None
    max_answer_length: int = 30


class QuestionAnswering(Task):
    name = "question-answering"
    model_class = AutoModelForQuestionAnswering
    primary_metric = "f1"
    # data.max_length: `to_cache` pads every feature's logits to it, but sees only a batch.
    # Set by `load_split` and `cache_layout`, which the cache job calls before any batch.
    max_length: int | None = None

    def head_size(self, labels: list[str]) -> int:
        return 2  # a start and an end logit per token

    def label_names(self, model_config) -> list[str]:
        return []  # outputs are token positions, not named classes

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> QAData:
        cfg = config.data
        check_settings(cfg, tokenizer)
        self.max_length = cfg.max_length
        raw = load_raw(cfg, split)
        features = raw.map(Featurizer(cfg, tokenizer), batched=True, desc=f"windows {split}",
                           remove_columns=raw.column_names)
        # The running feature index: the same data, tokenizer, max_length and stride give the
        # same ids, and the fingerprint (which hashes them and the tokens) covers all four.
        features = features.add_column("example_id", list(range(len(features))))
        examples = raw.select_columns(["example_id", cfg.text_pair_column, cfg.label_column])
        examples = examples.rename_columns({k: v for k, v in ((cfg.text_pair_column, "context"),
                                            (cfg.label_column, "answers")) if k != v})
        return QAData(features, [], fingerprint(features, cfg.max_length), examples,
                      config.eval.max_answer_length)

    def label_logits(self, outputs, batch: dict) -> torch.Tensor:
        logits = torch.stack([outputs.start_logits, outputs.end_logits], dim=1)  # [B, 2, L]
        padding = (batch["attention_mask"] == 0)[:, None, :]  # [B, 1, L]
        return logits.masked_fill(padding, PAD_LOGIT)

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        if config.cache.kind != "dense":
            raise ConfigError(f"cache.kind: task question-answering caches every position's "
                              f"start and end logit (a dense cache); got {config.cache.kind!r}")
        self.max_length = config.data.max_length
        return CacheLayout("dense", 2 * config.data.max_length, None, self.per_position)

    def to_cache(self, label_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B, 2, L] -> [B, 2 * max_length]: start logits, then end logits, padded."""
        if self.max_length is None:
            raise CacheError("question-answering: to_cache before load_split or cache_layout "
                             "(which set data.max_length)")
        width = label_logits.shape[-1]
        if width > self.max_length:
            raise CacheError(f"a batch of width {width} is longer than data.max_length "
                             f"{self.max_length}")
        padded = F.pad(label_logits, (0, self.max_length - width), value=PAD_LOGIT)
        return padded.reshape(len(label_logits), 2 * self.max_length)

    def from_cache(self, stored: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B, 2 * max_length] -> [B, 2, L], L the batch's width."""
        width = batch["input_ids"].shape[1]
        if stored.shape[1] % 2 or stored.shape[1] < 2 * width:
            raise CacheError(f"cached rows of {stored.shape[1]} values cannot hold start and "
                             f"end logits for a batch of width {width}")
        return stored.view(len(stored), 2, -1)[:, :, :width]

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: QAData) -> dict:
        """SQuAD exact match and F1: each question's answer is the best span over all its
        windows, read from the context through the tokens' character offsets."""
        from kdscale.data.batch import model_inputs

        model.eval()
        device = next(model.parameters()).device
        position = {fid: i for i, fid in enumerate(data.dataset["example_id"])}
        best: dict[int, tuple[float, int, int]] = {}  # source id -> (score, char start, end)
        decoding = data.dataset.select_columns(["offsets", "source_id"])
        for batch in loader:
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            logits = self.label_logits(model(**inputs), inputs).float().cpu()
            rows = decoding[[position[i] for i in batch["example_id"].tolist()]]
            _keep_best(best, logits, rows, data.max_answer_length)
        ids, examples = data.examples["example_id"], data.examples
        contexts = dict(zip(ids, examples["context"], strict=True))
        predictions = {i: contexts[i][a:b] for i, (_, a, b) in best.items()}
        golds = dict(zip(ids, (a["text"] for a in examples["answers"]), strict=True))
        return {**squad_scores(predictions, golds), "features": len(data.dataset)}


def _keep_best(best: dict, logits: torch.Tensor, rows: dict, max_answer_length: int) -> None:
    """Each feature's best span, kept where it beats its question's best so far."""
    context = torch.zeros(logits.shape[0], logits.shape[2], dtype=torch.bool)  # [B, L]
    for j, offsets in enumerate(rows["offsets"]):
        context[j, :len(offsets)] = torch.tensor([o[0] >= 0 for o in offsets])
    starts, ends, scores = best_spans(logits[:, 0], logits[:, 1], context, max_answer_length)
    for j, source in enumerate(rows["source_id"]):
        score = scores[j].item()
        if score > best.get(source, (float("-inf"),))[0]:
            offsets = rows["offsets"][j]
            best[source] = (score, offsets[starts[j]][0], offsets[ends[j]][1])


def check_settings(cfg: DataConfig, tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"teacher.tokenizer: task question-answering maps answers to tokens "
                          f"by character offsets, which only fast tokenizers report; "
                          f"{type(tokenizer).__name__} is a slow one (expected a tokenizer "
                          f"directory with a tokenizer.json)")
    if cfg.text_pair_column is None:
        raise ConfigError("data.text_pair_column: expected the context column (e.g. "
                          "'context') for task question-answering; data.text_column is "
                          "the question")
    if not 0 <= cfg.doc_stride < cfg.max_length:
        raise ConfigError(f"data.doc_stride: expected an overlap of 0 to fewer than "
                          f"data.max_length ({cfg.max_length}) tokens, got {cfg.doc_stride}")


class Featurizer:
    """A batch of questions -> its windows (features), for `datasets.map(batched=True)`."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        questions, contexts = batch[cfg.text_column], batch[cfg.text_pair_column]
        answers = [check_row(*row) for row in zip(batch["example_id"], questions, contexts,
                                                    batch[cfg.label_column], strict=True)]
        self.check_room(batch["example_id"], questions)
        encoded = self.tokenizer(questions, contexts, truncation="only_second",
                                 max_length=cfg.max_length, stride=cfg.doc_stride,
                                 return_overflowing_tokens=True, return_offsets_mapping=True)
        sources = encoded.pop("overflow_to_sample_mapping")
        all_offsets = encoded.pop("offset_mapping")
        features = {**encoded, "labels": [], "source_id": [], "offsets": []}
        for i, row in enumerate(sources):
            kinds = encoded.sequence_ids(i)  # 0 question, 1 context, None special
            offsets = [list(o) if k == 1 else NOT_CONTEXT for o, k in
                       zip(all_offsets[i], kinds, strict=True)]
            features["labels"].append(answer_tokens(offsets, *answers[row]))
            features["source_id"].append(batch["example_id"][row])
            features["offsets"].append(offsets)
        return features

    def check_room(self, ids: list[int], questions: list[str]) -> None:
        """Each window holds the question whole, so the context's share is what max_length
        leaves; windows must advance, so it must exceed the overlap."""
        cfg, tok = self.cfg, self.tokenizer
        specials = tok.num_special_tokens_to_add(pair=True)
        lengths = [len(q) for q in tok(questions, add_special_tokens=False)["input_ids"]]
        for example_id, n in zip(ids, lengths, strict=True):
            room = cfg.max_length - specials - n
            if room <= cfg.doc_stride:
                raise DataError(
                    f"data.max_length: the question of example id {example_id} has {n} "
                    f"tokens, which leaves {room} of max_length {cfg.max_length} for the "
                    f"context; expected more than data.doc_stride ({cfg.doc_stride}). Raise "
                    f"data.max_length or lower data.doc_stride")


def check_row(example_id: int, question, context, answers) -> tuple[int, int]:
    """The first gold answer's character span [start, end), every gold answer checked."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"data.text_column: example id {example_id} has no question")
    if not isinstance(context, str) or not context.strip():
        raise DataError(f"data.text_pair_column: example id {example_id} has no context")
    if not isinstance(answers, dict) or not answers.get("text"):
        raise DataError(f"data.label_column: example id {example_id} has no answer; expected "
                        f"{{'text': [...], 'answer_start': [...]}} with at least one answer "
                        f"(unanswerable questions, as in SQuAD v2, are not supported)")
    if len(answers["text"]) != len(answers.get("answer_start") or []):
        raise DataError(f"data.label_column: example id {example_id} has "
                        f"{len(answers['text'])} answer texts but answer_start "
                        f"{answers.get('answer_start')!r}; expected one start per text")
    for text, start in zip(answers["text"], answers["answer_start"], strict=True):
        found = context[start:start + len(text)]
        if found != text or not text:
            raise DataError(f"data.label_column: example id {example_id}: answer {text!r} "
                            f"does not match its context at answer_start {start}, which "
                            f"reads {found!r}")
    start = answers["answer_start"][0]
    return start, start + len(answers["text"][0])


def answer_tokens(offsets: list[list[int]], start: int, end: int) -> list[int]:
    """[first, last] token of the character span [start, end) in one window, or [0, 0]
    (the [CLS]) when the window's context does not hold all of it."""
    inside = [i for i, (a, _) in enumerate(offsets) if a >= 0]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return [0, 0]
    first = max(i for i in inside if offsets[i][0] <= start)
    last = min(i for i in inside if offsets[i][1] >= end)
    return [first, last]

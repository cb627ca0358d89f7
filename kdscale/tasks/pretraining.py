"""BERT's pre-training objective, distilled: masked LM plus next-sentence prediction (NSP).

The teacher is a `BertForPreTraining` (or any `AutoModelForPreTraining`): besides the
vocabulary at each masked position it scores whether sentence B followed sentence A. The
data is BERT's pre-training format: one sentence per row, a blank row between documents
(a `.txt` file as BERT's own tooling writes it, or any text column laid out so).

Each sentence is example A of one pair. Its B is drawn from (data.mask_seed, example id),
like the masks, over the rows read: the next sentence of the same document half of the
time (label 0, IsNext), otherwise a sentence from elsewhere (label 1, NotNext); the last
sentence of a document is always paired with one from elsewhere. The pair is tokenized as
[CLS] A [SEP] B [SEP] and masked as in task mlm.

The two heads share one set of rows: the NSP label sits at position 0, the [CLS], which is
never masked, and the NSP logits fill that position's row, padded to the vocabulary's width
with PAD_LOGIT (no probability after softmax). So the loss, the fused kernel and the top-k
cache treat the next-sentence decision as one more row of each example, and the KL, CE and
top-k cache of that row equal the 2-way ones exactly. The row weighs as much as one masked
token, where BERT's pre-training loss adds a separate NSP mean.
"""

from __future__ import annotations

import contextlib
import dataclasses

import datasets
import numpy as np
import torch
from transformers import AutoModelForPreTraining

from kdscale.config import Config
from kdscale.data import DataError, TaskData, fingerprint, load_raw
from kdscale.data.batch import IGNORE_INDEX
from kdscale.tasks.base import PAD_LOGIT, CacheLayout
from kdscale.tasks.mlm import MaskedLM, Masker

IS_NEXT, NOT_NEXT = 0, 1  # BertForPreTraining's next_sentence_label convention
NSP_POSITION = 0  # the [CLS] token: never masked, and where BERT reads the pair from


class Pretraining(MaskedLM):
    name = "pretraining"
    model_class = AutoModelForPreTraining

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        cfg = self.data_config(config)
        raw = load_raw(cfg, split)
        texts = [t if isinstance(t, str) else "" for t in raw[cfg.text_column]]
        pairs = sentence_pairs(texts, raw["example_id"], cfg.mask_seed)
        if not pairs["example_id"]:
            raise DataError(f"data.text_column: no {split} row has text in column "
                            f"{cfg.text_column!r}")
        masker = Masker(tokenizer, cfg.mlm_probability, cfg.mask_seed)
        encoded = tokenizer(pairs["text"], pairs["text_pair"], truncation=True,
                            max_length=cfg.max_length, return_special_tokens_mask=True)
        input_ids, labels = [], []
        for ids, specials, example_id, next_label in zip(
                encoded["input_ids"], encoded.pop("special_tokens_mask"), pairs["example_id"],
                pairs["next_sentence_label"], strict=True):
            masked_ids, masked_labels = masker(ids, specials, example_id)
            masked_labels[NSP_POSITION] = next_label
            input_ids.append(masked_ids)
            labels.append(masked_labels)
        columns = {**encoded, "input_ids": input_ids, "labels": labels,
                   "example_id": pairs["example_id"]}
        tokenized = datasets.Dataset.from_dict(columns)
        return TaskData(tokenized, [], fingerprint(tokenized, cfg.max_length))

    def head_context(self, model: torch.nn.Module, batch: dict):
        """The whole head: the NSP row is packed into position 0 of the [B, L, V] logits."""
        return contextlib.nullcontext()

    def label_logits(self, outputs, batch: dict) -> torch.Tensor:
        """[B, L, V]: the MLM logits, with the NSP logits (padded) as position 0's row."""
        logits = outputs.prediction_logits
        nsp = outputs.seq_relationship_logits
        row = torch.full_like(logits[:, NSP_POSITION], PAD_LOGIT)
        row[:, : nsp.shape[-1]] = nsp
        # Position 0's MLM logits are never a row of the loss, so they are overwritten
        # in place rather than copying the [B, L, V] tensor.
        logits[:, NSP_POSITION] = row
        return logits

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        layout = super().cache_layout(config, model_config)
        return dataclasses.replace(
            layout, masking={**layout.masking, "next_sentence": "next-or-random-0.5"})

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        """Masked-token accuracy and perplexity, and next-sentence accuracy, held out."""
        from kdscale.data.batch import model_inputs

        model.eval()
        correct, nll, count, nsp_correct, pairs = 0, 0.0, 0, 0, 0
        for batch in loader:
            logits = self.label_logits(model(**model_inputs(batch)), batch)
            nsp_labels = batch["labels"][:, NSP_POSITION]
            nsp_correct += int((logits[:, NSP_POSITION].argmax(-1) == nsp_labels).sum())
            pairs += len(nsp_labels)
            masked = batch["labels"].clone()
            masked[:, NSP_POSITION] = IGNORE_INDEX
            rows, labels = self.rows(logits, {"labels": masked})
            correct += int((rows.argmax(-1) == labels).sum())
            nll += float(torch.nn.functional.cross_entropy(rows.float(), labels, reduction="sum"))
            count += len(labels)
        count = max(count, 1)
        return {"accuracy": correct / count, "perplexity": float(np.exp(nll / count)),
                "next_sentence_accuracy": nsp_correct / max(pairs, 1),
                "masked_tokens": count, "examples": len(data.dataset)}


def sentence_pairs(texts: list[str], ids: list[int], seed: int) -> dict[str, list]:
    """Each non-blank row as sentence A with its B and next-sentence label; blank rows end
    documents. The draw depends on (seed, the row's id) and the rows given, never on the
    process or the run."""
    sentences, document, documents = [], 0, []
    for text, example_id in zip(texts, ids, strict=True):
        if text.strip():
            sentences.append((text, example_id))
            documents.append(document)
        else:
            document += 1
    out = {"text": [], "text_pair": [], "next_sentence_label": [], "example_id": []}
    for i, (text, example_id) in enumerate(sentences):
        rng = np.random.default_rng([seed, example_id, 1])  # a stream apart from the masks'
        has_next = i + 1 < len(sentences) and documents[i + 1] == documents[i]
        if has_next and rng.random() < 0.5:
            partner, label = sentences[i + 1][0], IS_NEXT
        else:
            partner, label = sentences[_elsewhere(rng, i, len(sentences))][0], NOT_NEXT
        out["text"].append(text)
        out["text_pair"].append(partner)
        out["next_sentence_label"].append(label)
        out["example_id"].append(example_id)
    return out


def _elsewhere(rng: np.random.Generator, i: int, n: int) -> int:
    """A sentence other than i and its successor (i itself in a corpus of two or fewer)."""
    if n <= 2:
        return i
    j = int(rng.integers(n - 2))
    return j if j < i else j + 2

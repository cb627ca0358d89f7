"""Masked-LM ("general") distillation: the student learns the teacher's distribution over
the vocabulary at masked positions, as DistilBERT and TinyBERT were pre-trained.

Masks are drawn once per example from (data.mask_seed, example id), never per epoch: a
cache of the teacher's outputs at the masked positions only matches inputs masked the same
way. round(p * n) of an example's n ordinary tokens are chosen (at least one), and each is
replaced as BERT did: 80% by [MASK], 10% by a random token, 10% left as it was. The label of
a chosen position is its original token; every other position is -100.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import AutoModelForMaskedLM

from kdscale.config import Config, ConfigError, DataConfig
from kdscale.data import DataError, TaskData, fingerprint, load_raw
from kdscale.data.batch import IGNORE_INDEX
from kdscale.models.heads import head_on_rows
from kdscale.tasks.base import CacheLayout, Task, sampling_recipe, tail_temperature

RECIPE = "bert-80-10-10"  # what a chosen position becomes: [MASK], a random token, itself


class MaskedLM(Task):
    name = "mlm"
    model_class = AutoModelForMaskedLM
    primary_metric = "accuracy"  # of the predicted token at held-out masked positions
    per_position = True

    def head_size(self, labels: list[str]) -> int:
        return 2  # unused: a masked LM's head predicts the vocabulary

    def head_context(self, model: torch.nn.Module, batch: dict):
        """The vocabulary head on the masked positions alone: logits [R, V], not [B, T, V]."""
        return head_on_rows(model, batch["labels"] != IGNORE_INDEX)

    def rows(self, label_logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        valid = batch["labels"] != IGNORE_INDEX
        if label_logits.dim() == 2:  # the head ran on the rows alone (head_context)
            return label_logits, batch["labels"][valid]
        return label_logits[valid], batch["labels"][valid]

    def from_pretrained(self, name_or_dir, labels: list[str] | None = None, **options):
        return self.model_class.from_pretrained(str(name_or_dir), **options)  # vocab outputs

    def label_names(self, model_config) -> list[str]:
        return []

    def data_config(self, config: Config) -> DataConfig:
        return dataclasses.replace(config.data, label_column=None, text_pair_column=None)

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        cfg = self.data_config(config)
        raw = load_raw(cfg, split)
        raw = raw.filter(lambda texts: [isinstance(t, str) and bool(t.strip()) for t in texts],
                         input_columns=[cfg.text_column], batched=True,
                         desc=f"dropping empty {split} lines")
        if len(raw) == 0:
            raise DataError(f"data.text_column: no {split} row has text in column "
                            f"{cfg.text_column!r}")
        masker = Masker(tokenizer, cfg.mlm_probability, cfg.mask_seed)

        def tokenize(batch: dict) -> dict:
            encoded = tokenizer(batch[cfg.text_column], truncation=True,
                                max_length=cfg.max_length, return_special_tokens_mask=True)
            masked = [masker(ids, specials, example_id) for ids, specials, example_id in zip(
                encoded["input_ids"], encoded.pop("special_tokens_mask"), batch["example_id"],
                strict=True)]
            encoded["input_ids"] = [ids for ids, _ in masked]
            encoded["labels"] = [labels for _, labels in masked]
            return encoded

        tokenized = raw.map(tokenize, batched=True, desc=f"tokenizing and masking {split}",
                            remove_columns=[c for c in raw.column_names if c != "example_id"])
        return TaskData(tokenized, [], fingerprint(tokenized, cfg.max_length))

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        if config.cache.kind == "dense":
            raise ConfigError(f"cache.kind: task mlm caches the teacher's top-k logits (or "
                              f"sampled tokens) at the masked positions (a dense row would be "
                              f"{model_config.vocab_size} wide); expected topk or sampled, got "
                              f"{config.cache.kind!r}")
        return CacheLayout("topk", model_config.vocab_size, config.cache.k, self.per_position,
                           masking=masking_recipe(config),
                           tail_temperature=tail_temperature(config),
                           sampling=sampling_recipe(config))

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        """Accuracy and perplexity of the model's predictions at the held-out masked positions."""
        from kdscale.data.batch import model_inputs

        model.eval()
        correct, nll, count = 0, 0.0, 0
        for batch in loader:
            rows, labels = self.rows(self.label_logits(model(**model_inputs(batch)), batch), batch)
            correct += int((rows.argmax(-1) == labels).sum())
            nll += float(torch.nn.functional.cross_entropy(rows.float(), labels, reduction="sum"))
            count += len(labels)
        count = max(count, 1)
        return {"accuracy": correct / count, "perplexity": float(np.exp(nll / count)),
                "masked_tokens": count, "examples": len(data.dataset)}


def masking_recipe(config: Config) -> dict:
    """What decides the masks, recorded in the cache: a cache is refused for data masked
    otherwise."""
    return {"seed": config.data.mask_seed, "probability": config.data.mlm_probability,
            "recipe": RECIPE}


class Masker:
    """The masks of one example, a function of its tokens, its id and the seed alone."""

    def __init__(self, tokenizer, probability: float, seed: int):
        if tokenizer.mask_token_id is None:
            raise ConfigError("task mlm: the tokenizer has no mask token ([MASK]); expected a "
                              "BERT-family tokenizer")
        self.probability, self.seed = probability, seed
        self.mask_id, self.vocab = tokenizer.mask_token_id, len(tokenizer)
        self.specials = set(tokenizer.all_special_ids)
        if len(self.specials) >= self.vocab:  # random replacements would be drawn forever
            raise ConfigError(f"task mlm: the tokenizer's {self.vocab} tokens are all special "
                              f"ones; expected a vocabulary to mask and predict")

    def __call__(self, ids: list[int], special: list[int],
                 example_id: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng([self.seed, example_id])
        candidates = [i for i, s in enumerate(special) if not s]
        labels = [IGNORE_INDEX] * len(ids)
        if not candidates:
            return ids, labels
        count = max(1, round(self.probability * len(candidates)))
        chosen = sorted(rng.choice(candidates, size=count, replace=False).tolist())
        ids = list(ids)
        for position, draw in zip(chosen, rng.random(count), strict=True):
            labels[position] = ids[position]
            if draw < 0.8:
                ids[position] = self.mask_id
            elif draw < 0.9:
                ids[position] = self._random_token(rng)
        return ids, labels

    def _random_token(self, rng: np.random.Generator) -> int:
        while True:  # an ordinary token: a special one would change the input's structure
            token = int(rng.integers(self.vocab))
            if token not in self.specials:
                return token

"""Token classification (NER): one tag per word, predicted at the word's first word piece.

A row holds a list of words (`data.text_column`, e.g. "tokens") and a list of as many tags
(`data.label_column`, e.g. "ner_tags"): tag ids with a ClassLabel feature (hub datasets such
as conll2003), or tag names ("B-PER"). The words are tokenized as given
(`is_split_into_words`); a word's tag goes on its first piece, and every later piece and
special token is -100, so each word is one row of the loss, as in BERT's NER recipe.

The cache keeps every tag's logit at each word start (top-k with k = the number of tags), so
it is lossless and a few dozen bytes per word.
"""

from __future__ import annotations

import datasets
import torch
from transformers import AutoModelForTokenClassification

from kdscale.config import Config, ConfigError, DataConfig
from kdscale.data import DataError, TaskData, fingerprint, load_raw
from kdscale.data.batch import IGNORE_INDEX
from kdscale.tasks.base import CacheLayout, Task
from kdscale.tasks.entity_f1 import entity_scores

# List features across datasets versions (3.x: Sequence or a Python list; 4+: List).
_LIST_FEATURES = (list, *(getattr(datasets, n) for n in ("List", "LargeList", "Sequence")
                          if hasattr(datasets, n)))


class TokenClassification(Task):
    name = "token-classification"
    model_class = AutoModelForTokenClassification
    primary_metric = "entity_f1"
    per_position = True

    def load_split(self, config: Config, tokenizer, split: str,
                label_names: list[str] | None = None) -> TaskData:
        """Tokenize one split and align its tags; the eval split (and the cache and distill
        runs) pass the teacher's tag names, so a tag keeps its id across splits."""
        cfg = config.data
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("task token-classification: expected a fast tokenizer (it maps "
                              "word pieces back to words); this one is not")
        raw, where = load_words(cfg, split)
        names = label_names or tag_names(raw, cfg)
        if not names:
            raise DataError(f"data.label_column: {where} has no tags in column "
                            f"{cfg.label_column!r}; expected one tag per word")
        aligner = Aligner(tokenizer, cfg, names, tag_lookup(raw, cfg, names), where)
        tokenized = raw.map(aligner, batched=True, desc=f"tokenizing {split}",
                            remove_columns=[c for c in raw.column_names if c != "example_id"])
        return TaskData(tokenized, names, fingerprint(tokenized, cfg.max_length))

    def cache_layout(self, config: Config, model_config) -> CacheLayout:
        # cache.kind and cache.k do not apply: a row of every tag is small, so none is dropped.
        tags = model_config.num_labels
        return CacheLayout("topk", tags, tags, per_position=self.per_position)

    @torch.inference_mode()
    def metrics(self, model: torch.nn.Module, loader, data: TaskData) -> dict:
        """Entity-level micro precision, recall and F1 (CoNLL's scoring) and word accuracy,
        over the words that fit in data.max_length."""
        gold, predicted = predict_tags(model, loader, data.label_names)
        scores = entity_scores(gold, predicted)
        return {**scores, "examples": len(gold)}


def load_words(cfg: DataConfig, split: str) -> tuple[datasets.Dataset, str]:
    """The split's rows, with both columns checked to hold lists."""
    if cfg.text_pair_column is not None:
        raise ConfigError("data.text_pair_column: task token-classification reads one list of "
                          "words per row; expected null")
    raw = load_raw(cfg, split)  # tags are lists: load_raw leaves them to Aligner.check_row
    where = describe_source(cfg, split)
    for key in ("text_column", "label_column"):
        column = getattr(cfg, key)
        if not isinstance(raw.features[column], _LIST_FEATURES):
            raise DataError(f"data.{key}: column {column!r} of {where} holds "
                            f"{raw.features[column]}; expected a list per row (the words of "
                            f"a sentence, or their tags)")
    return raw, where


def describe_source(cfg: DataConfig, split: str) -> str:
    path = cfg.train_file if split == "train" else cfg.eval_file
    if path is not None:
        return f"data file {path}"
    hub_split = cfg.train_split if split == "train" else cfg.eval_split
    return f"dataset {cfg.dataset}/{cfg.subset or ''} split {hub_split}"


def _tag_class_label(raw: datasets.Dataset, cfg: DataConfig) -> datasets.ClassLabel | None:
    feature = raw.features[cfg.label_column]
    inner = feature[0] if isinstance(feature, list) else feature.feature
    return inner if isinstance(inner, datasets.ClassLabel) else None


def tag_names(raw: datasets.Dataset, cfg: DataConfig) -> list[str]:
    """The training split's tags: a ClassLabel's names, else the sorted distinct tags
    (tag ids without names are named "0", "1", ... up to the largest)."""
    class_label = _tag_class_label(raw, cfg)
    if class_label is not None:
        return list(class_label.names)
    values = {tag for tags in raw[cfg.label_column] if isinstance(tags, list) for tag in tags}
    if values and all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def tag_lookup(raw: datasets.Dataset, cfg: DataConfig, names: list[str]) -> dict:
    """Stored tag (name, or id of a ClassLabel) -> id in `names`. A ClassLabel's ids are
    mapped through its names, so an eval split with another tag order still lines up."""
    ids = {name: i for i, name in enumerate(names)}
    class_label = _tag_class_label(raw, cfg)
    if class_label is None:
        return ids
    return {i: ids[name] for i, name in enumerate(class_label.names) if name in ids}


class Aligner:
    """A `datasets.map` function: words -> word pieces, tags -> the first piece of each word."""

    def __init__(self, tokenizer, cfg: DataConfig, names: list[str], lookup: dict, where: str):
        self.tokenizer, self.cfg, self.where = tokenizer, cfg, where
        self.names, self.lookup = names, lookup

    def __call__(self, batch: dict) -> dict:
        words, tags = batch[self.cfg.text_column], batch[self.cfg.label_column]
        for example_id, row_words, row_tags in zip(batch["example_id"], words, tags, strict=True):
            self.check_row(example_id, row_words, row_tags)
        encoded = self.tokenizer(words, is_split_into_words=True, truncation=True,
                                 max_length=self.cfg.max_length)
        encoded["labels"] = [self.align(encoded.word_ids(i), row_tags)
                             for i, row_tags in enumerate(tags)]
        return encoded

    def align(self, word_ids: list[int | None], row_tags: list) -> list[int]:
        labels, previous = [], None
        for word in word_ids:
            first_piece = word is not None and word != previous
            labels.append(self.lookup[self.key(row_tags[word])] if first_piece else IGNORE_INDEX)
            previous = word
        return labels

    def key(self, tag):
        return tag if isinstance(tag, int) and tag in self.lookup else str(tag)

    def check_row(self, example_id: int, words, tags) -> None:
        cfg, where = self.cfg, f"{self.where}, example id {example_id}"
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"data.text_column: {where} has {words!r} in column "
                            f"{cfg.text_column!r}; expected a list of words (strings)")
        if not isinstance(tags, list) or len(tags) != len(words):
            count = len(tags) if isinstance(tags, list) else repr(tags)
            raise DataError(f"data.label_column: {where} has {len(words)} words but {count} "
                            f"tags in column {cfg.label_column!r}; expected one tag per word")
        if not all(isinstance(tag, (str, int)) for tag in tags):
            raise DataError(f"data.label_column: {where} has tags {tags!r}; expected a tag "
                            f"name or id for every word")
        unknown = [tag for tag in tags if self.key(tag) not in self.lookup]
        if unknown:
            raise DataError(f"data.label_column: {where} has tag {unknown[0]!r}, which is not "
                            f"among the training tags {self.names}")


def predict_tags(model: torch.nn.Module, loader,
                 names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tag names per example, one per word (its first piece's prediction)."""
    from kdscale.data.batch import model_inputs

    model.eval()
    gold, predicted = [], []
    for batch in loader:
        preds = model(**model_inputs(batch)).logits.argmax(-1).cpu()  # [B, L]
        labels = batch["labels"].cpu()
        for row_labels, row_preds in zip(labels, preds, strict=True):
            words = row_labels != IGNORE_INDEX
            gold.append([names[i] for i in row_labels[words].tolist()])
            predicted.append([names[i] for i in row_preds[words].tolist()])
    return gold, predicted

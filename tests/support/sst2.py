"""Real SST-2 rows from ../shared/data, and a tiny pretrained BERT whose WordPiece vocabulary is
learned from them: a stand-in with MiniLM's shape for the benchmark tests."""

from __future__ import annotations

from pathlib import Path

from tokenizers import BertWordPieceTokenizer, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]


TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"


def tiny_pretrained_bert(directory: Path) -> Path:
    """A 6-layer BERT of width 32 with its tokenizer: a stand-in with MiniLM's shape."""
    sentences = [line.split("\t", 1)[1] for line in TRAIN.read_text().splitlines()[1:2001]]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(sentences, vocab_size=1500)
    # Trained from scratch, it has no [CLS] ... [SEP] template yet.
    wordpiece.post_processor = processors.BertProcessing(
        ("[SEP]", wordpiece.token_to_id("[SEP]")), ("[CLS]", wordpiece.token_to_id("[CLS]")))
    directory.mkdir(parents=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32,
                        num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    return directory

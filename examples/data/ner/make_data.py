"""A small synthetic NER task, so `configs/ner_local.yaml` runs offline with nothing downloaded.

    python examples/data/ner/make_data.py     # rewrites train.jsonl, dev.jsonl and tokenizer/

Each row is a filled template: {"tokens": [words], "ner_tags": [IOB2 tags]}, with persons,
locations and organizations of one to three words (so B- and I- tags both occur). Jordan,
Georgia and Washington are persons in some rows and locations in others: the context, not the
word, decides their tag. The dev split also draws some names that never occur in training.

The tokenizer is a cased BERT WordPiece over this vocabulary. Long names are in it only as
4-letter pieces ("Papa ##dopo ##ulos"), and every letter is a piece, so long and unseen names
split into several word pieces, as real names do under a real BERT vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED, N_TRAIN, N_DEV = 0, 320, 60
HELD_OUT_SHARE = 0.25  # dev entities drawn from names training never shows

FIRST = ["Anna", "Maria", "John", "Peter", "Ines", "Tomas", "Yuki", "Omar", "Lena", "David",
         "Sofia", "Ravi", "Jordan", "Georgia", "Chiamaka", "Bartholomew"]
LAST = ["Smith", "Garcia", "Novak", "Kim", "Okafor", "Schmidt", "Washington", "Papadopoulos",
        "Wojciechowski", "Castellanos", "Rosenkranz", "Abernathy"]
LOCATIONS = ["Paris", "Berlin", "Lagos", "Lima", "Oslo", "Jordan", "Georgia", "Washington",
             "New York", "San Francisco", "Rio de Janeiro", "Kuala Lumpur", "Buenos Aires",
             "Ouagadougou", "Thessaloniki", "Saint Petersburg"]
ORGANIZATIONS = ["Acme Corporation", "Globex", "United Nations", "Red Cross", "Bank of Scotland",
                 "Initech", "Northwind Traders", "Stark Industries", "Umbrella Pharmaceuticals",
                 "World Health Organization", "Hooli"]
HELD_OUT = {"PER": ["Magnus Lindqvist", "Aiko", "Fernando Villanueva"],
            "LOC": ["Montevideo", "Cape Town", "Ulaanbaatar"],
            "ORG": ["Vandelay Industries", "Cyberdyne Systems", "Tyrell"]}
TEMPLATES = [
    "{PER} visited {LOC} last week .",
    "{PER} works for {ORG} in {LOC} .",
    "The {ORG} office in {LOC} hired {PER} .",
    "{ORG} announced that {PER} will lead its team in {LOC} .",
    "Yesterday {PER} met {PER} in {LOC} .",
    "{PER} moved from {LOC} to {LOC} in 2019 .",
    "According to {ORG} , prices in {LOC} rose again .",
    "{PER} said the deal with {ORG} was signed .",
    "Fans in {LOC} cheered for {PER} .",
    "The weather in {LOC} was cold .",
    "{PER} of {ORG} flew to {LOC} on Monday .",
    "Nothing happened on Friday .",
    "The meeting was moved to the next morning .",
]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WHOLE_WORD_MAX = 8  # longer words are in the vocabulary only as pieces


def person(rng: random.Random) -> str:
    first = rng.choice(FIRST)
    return first if rng.random() < 0.3 else f"{first} {rng.choice(LAST)}"


def entity(kind: str, rng: random.Random, held_out: bool) -> str:
    if held_out:
        return rng.choice(HELD_OUT[kind])
    if kind == "PER":
        return person(rng)
    return rng.choice(LOCATIONS if kind == "LOC" else ORGANIZATIONS)


def make_row(rng: random.Random, held_out_share: float) -> dict:
    tokens, tags = [], []
    for word in rng.choice(TEMPLATES).split():
        if not word.startswith("{"):
            tokens.append(word)
            tags.append("O")
            continue
        kind = word[1:-1]
        words = entity(kind, rng, rng.random() < held_out_share).split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "ner_tags": tags}


def make_rows(n: int, rng: random.Random, held_out_share: float) -> list[dict]:
    return [make_row(rng, held_out_share) for _ in range(n)]


def splits(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    return {"train": make_rows(N_TRAIN, rng, 0.0), "dev": make_rows(N_DEV, rng, HELD_OUT_SHARE)}


def vocabulary() -> list[str]:
    """BERT's specials, every short word whole, long words as 4-letter pieces, and every
    letter and digit alone and as a continuation (so no word becomes [UNK])."""
    phrases = TEMPLATES + FIRST + LAST + LOCATIONS + ORGANIZATIONS
    words = {w for phrase in phrases for w in phrase.split() if not w.startswith("{")}
    pieces = set()
    for word in words:
        if len(word) <= WHOLE_WORD_MAX:
            pieces.add(word)
            continue
        chunks = [word[i:i + 4] for i in range(0, len(word), 4)]
        pieces |= {chunks[0], *(f"##{c}" for c in chunks[1:])}
    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    pieces |= set(characters) | {f"##{c}" for c in characters}
    return SPECIAL_TOKENS + sorted(pieces)


def write_tokenizer(directory: Path) -> None:
    from transformers import BertTokenizer  # transformers 5: the fast (Rust) tokenizer

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=False, strip_accents=False,
                              tokenize_chinese_chars=False)
    tokenizer.save_pretrained(str(directory))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(directory: Path = HERE) -> None:
    for name, rows in splits().items():
        write_jsonl(directory / f"{name}.jsonl", rows)
    write_tokenizer(directory / "tokenizer")
    print(f"wrote {directory}/{{train,dev}}.jsonl ({N_TRAIN}, {N_DEV} rows) and tokenizer/ "
          f"({len(vocabulary())} tokens)")


if __name__ == "__main__":
    main()

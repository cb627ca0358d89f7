"""A small synthetic SQuAD-style task, and a word-level tokenizer that covers it.

Each context states facts about a few people (birth city and year, favourite colour, job);
each question asks for one fact of one person, so the answer is a span of the context and
finding it needs the person's name matched to the right sentence. About a third of the
contexts are long enough to need several windows at max_length 64 with doc_stride 32.

    python examples/data/squad/make_data.py            # writes next to this file
    python examples/data/squad/make_data.py --out DIR

Writes train.jsonl, dev.jsonl (the hub's `answers` format: {"text": [...], "answer_start":
[...]}, character offsets; dev rows may list several gold answers) and tokenizer/; and the
contexts again as train_sentences.txt and dev_sentences.txt in BERT's pre-training format
(one sentence per line, a blank line between contexts) for task pretraining. The same seed
always gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
         "Karin", "Leo", "Maria", "Nils", "Olga", "Paul", "Rosa", "Simon", "Tara", "Viktor",
         "Wendy", "Yusuf", "Zoe", "Omar", "Lena", "Marco", "Nora", "Ivan"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Oslo", "Dublin",
          "Warsaw", "Athens", "Helsinki", "Budapest", "Zurich", "Porto", "Krakow", "Lyon",
          "Munich", "Milan", "Seville"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
           "brown", "pink", "silver"]
JOBS = ["teacher", "doctor", "baker", "pilot", "lawyer", "nurse", "farmer", "painter",
        "engineer", "chemist", "librarian", "carpenter", "dentist", "journalist", "architect"]
YEARS = [str(y) for y in range(1950, 2010)]
# Words of the templates below (the tokenizer's vocabulary is these plus the pools above).
TEMPLATE_WORDS = ("was born in . ' s favourite colour is works as a an where which year what "
                  "does work as ? do lives and likes the most colour of job").split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def person(rng: random.Random, name: str) -> dict:
    return {"name": name, "city": rng.choice(CITIES), "year": rng.choice(YEARS),
            "colour": rng.choice(COLOURS), "job": rng.choice(JOBS)}


def sentences(p: dict) -> list[tuple[str, str, str]]:
    """(sentence, fact, answer) for each fact of one person; the answer occurs in the
    sentence after the name."""
    n = p["name"]
    return [(f"{n} was born in {p['city']} in {p['year']}.", "city", p["city"]),
            (f"{n} was born in {p['city']} in {p['year']}.", "year", p["year"]),
            (f"{n}'s favourite colour is {p['colour']}.", "colour", p["colour"]),
            (f"{n} works as {article(p['job'])} {p['job']}.", "job", p["job"])]


QUESTIONS = {"city": "Where was {} born?", "year": "In which year was {} born?",
             "colour": "What is {}'s favourite colour?", "job": "What does {} work as?"}


def make_context(rng: random.Random) -> tuple[str, list[dict]]:
    """A context and, for every fact in it, where its answer starts."""
    people = [person(rng, n) for n in rng.sample(NAMES, rng.choice([1, 2, 2, 3, 4, 5]))]
    text, facts = "", []
    for p in people:
        seen = set()
        for sentence, fact, answer in sentences(p):
            if sentence not in seen:  # city and year share one sentence
                seen.add(sentence)
                text += ("" if not text else " ") + sentence
            start = text.rindex(sentence) + sentence.index(answer, len(p["name"]))
            facts.append({"name": p["name"], "fact": fact, "answer": answer, "start": start})
    return text, facts


def gold_answers(context: str, fact: dict, variants: bool) -> dict:
    """The answer; on dev also a longer accepted variant ("in 1987", "a teacher")."""
    texts, starts = [fact["answer"]], [fact["start"]]
    if variants and fact["fact"] in ("year", "job"):
        before = context.rfind(" ", 0, fact["start"] - 1) + 1  # the word before the answer
        texts.append(context[before:fact["start"] + len(fact["answer"])])
        starts.append(before)
    return {"text": texts, "answer_start": starts}


def make_rows(rng: random.Random, n: int, variants: bool) -> list[dict]:
    rows = []
    while len(rows) < n:
        context, facts = make_context(rng)
        for fact in rng.sample(facts, min(3, len(facts))):  # a few questions per context
            question = QUESTIONS[fact["fact"]].format(fact["name"])
            rows.append({"id": f"q{len(rows)}", "question": question, "context": context,
                         "answers": gold_answers(context, fact, variants)})
    return rows[:n]


def build_tokenizer():
    """A word-level tokenizer with BERT's special tokens and [CLS] A [SEP] B [SEP] layout;
    its vocabulary is every word the templates can produce, so no token is [UNK]."""
    from kdscale.commands.demo import word_level_tokenizer

    words = {w.lower() for w in NAMES + CITIES + COLOURS + JOBS + YEARS + TEMPLATE_WORDS}
    return word_level_tokenizer(SPECIAL_TOKENS + sorted(words))  # "Anna's" -> anna ' s


def write_task(directory: Path, n_train: int = 300, n_dev: int = 50, seed: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n, variants in (("train", n_train, False), ("dev", n_dev, True)):
        rows = make_rows(rng, n, variants)
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}_sentences.txt").write_text(sentences_text(rows))
    build_tokenizer().save_pretrained(str(directory / "tokenizer"))


def sentences_text(rows: list[dict]) -> str:
    """Each distinct context, one sentence per line, contexts apart by a blank line."""
    contexts = dict.fromkeys(r["context"] for r in rows)
    return "\n".join("".join(f"{s.removesuffix('.')}.\n" for s in c.split(". "))
                     for c in contexts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_task(args.out, seed=args.seed)
    print(f"wrote {args.out}/train.jsonl, dev.jsonl, *_sentences.txt and tokenizer/")


if __name__ == "__main__":
    main()

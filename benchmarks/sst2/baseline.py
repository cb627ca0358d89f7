"""The plain recipe: the classic Hinton-style KD recipe of BERT distillation (Hinton, Vinyals
& Dean 2015), written the obvious way and kept that way on purpose: a Hugging Face model, a
PyTorch loop, a student made of chosen teacher layers (the first K, as the recipe has it),
and the teacher run online at every step:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)

Four engineering options, each defaulting to the recipe as users run it today, let the
benchmark's ablation add kdscale's choices one at a time (`OPTIONS`):

    padding            max_length: every input padded to max_length, as run_glue.py does by
                       default; dynamic: batches of rows of similar length, each padded to its
                       longest row
    fused_adamw        torch's fused AdamW (one pass over all parameters) instead of its
                       default loop over the parameter tensors
    freeze_embeddings  the students' token embeddings left out of training
    teacher            online: its forward pass at every student step; cached: its logits for
                       every training row computed once, before the students

No kdscale code runs here; the benchmark times it against kdscale's pipeline and evaluates
its models with the same evaluator.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OPTIONS = {"padding": ("max_length", "dynamic"), "fused_adamw": (False, True),
           "freeze_embeddings": (False, True), "teacher": ("online", "cached")}
TEACHER_OPTIONS = ("padding", "fused_adamw")  # the others change the students alone
COLUMNS = ["input_ids", "attention_mask", "labels", "row"]


def options_of(hp: dict) -> dict:
    """The recipe's engineering options, checked; the first of each allowed pair by default."""
    options = {key: hp.get(key, allowed[0]) for key, allowed in OPTIONS.items()}
    for key, value in options.items():
        if value not in OPTIONS[key]:
            raise SystemExit(f"baseline.{key}: expected one of {OPTIONS[key]}, got {value!r}")
    return options


@dataclass
class TrainRows:
    data: datasets.Dataset  # COLUMNS, as torch tensors; `row` is the row's place in it
    padding: str
    pad_id: int

    def loader(self, batch_size: int, seed: int, shuffle: bool = True):
        if self.padding == "max_length":  # every row is max_length long: the default loader
            return torch.utils.data.DataLoader(self.data, batch_size=batch_size,
                                               shuffle=shuffle)
        lengths = [len(ids) for ids in self.data.with_format(None)["input_ids"]]
        batches = SimilarLengthBatches(lengths, batch_size, seed, shuffle)
        return torch.utils.data.DataLoader(self.data, batch_sampler=batches,
                                           collate_fn=self.pad_to_longest)

    def pad_to_longest(self, rows: list[dict]) -> dict:
        def pad(name: str, value: int) -> torch.Tensor:
            return torch.nn.utils.rnn.pad_sequence([r[name] for r in rows], batch_first=True,
                                                   padding_value=value)

        return {"input_ids": pad("input_ids", self.pad_id),
                "attention_mask": pad("attention_mask", 0),
                "labels": torch.stack([r["labels"] for r in rows]),
                "row": torch.stack([r["row"] for r in rows])}


class SimilarLengthBatches(torch.utils.data.Sampler):
    """Batches of rows of similar length in a random order: the rows shuffled, cut into pools
    of `pool` batches, each pool sorted by length and cut into batches, the batches shuffled.
    Without `shuffle`, every row sorted by length (teacher inference)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool,
                 pool: int = 50):
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.pool_rows = batch_size * pool if shuffle else len(lengths)
        self.rng = random.Random(seed)  # advances each epoch: a new order every epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = list(range(len(self.lengths)))
        if self.shuffle:
            self.rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.pool_rows):
            pool = sorted(order[start:start + self.pool_rows], key=self.lengths.__getitem__)
            batches += [pool[i:i + self.batch_size] for i in range(0, len(pool),
                                                                   self.batch_size)]
        if self.shuffle:
            self.rng.shuffle(batches)
        return iter(batches)


def load_train(path: str, tokenizer, max_length: int, max_examples: int | None,
               padding: str) -> TrainRows:
    """The first `max_examples` rows of a label<TAB>sentence file, tokenized; padded to
    max_length with padding "max_length", left to the loader with "dynamic"."""
    data = datasets.load_dataset("csv", data_files=path, delimiter="\t", quoting=3,
                                 split="train")
    if max_examples:
        data = data.select(range(min(max_examples, len(data))))
    pad = "max_length" if padding == "max_length" else False
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, padding=pad,
                                        max_length=max_length), batched=True)
    data = data.rename_column("label", "labels").add_column("row", list(range(len(data))))
    return TrainRows(data.with_format("torch", columns=COLUMNS), padding,
                     tokenizer.pad_token_id)


def make_optimizer(model, lr: float, fused: bool):
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones left out
    # fused=None is torch's own default (a loop over the tensors on a CPU), as users run it.
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True if fused else None)


def train(model, rows: TrainRows, hp: dict, seed: int, loss_fn, options: dict):
    """`hp["epochs"]` epochs of AdamW over shuffled batches; loss_fn(model, batch) -> loss,
    under bf16 autocast when `hp["precision"]` is bf16 (the teacher's forward pass too).
    Returns the model and its number of optimizer steps."""
    torch.manual_seed(seed)
    loader = rows.loader(hp["batch_size"], seed)
    steps = hp["epochs"] * len(loader)
    optimizer = make_optimizer(model, hp["learning_rate"], options["fused_adamw"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    model.to(DEVICE).train()
    for _ in range(hp["epochs"]):
        for batch in loader:
            with torch.autocast(DEVICE.type, torch.bfloat16, enabled=hp["precision"] == "bf16"):
                loss = loss_fn(model, {k: v.to(DEVICE) for k, v in batch.items()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return model.eval(), steps


def model_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def finetune_teacher(model_dir: str, rows: TrainRows, hp: dict, seed: int, options: dict):
    torch.manual_seed(seed)  # the new classifier head
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return train(teacher, rows, hp, seed, lambda model, batch: model(
        **model_inputs(batch), labels=batch["labels"]).loss, options)


@torch.no_grad()
def teacher_logits(teacher, rows: TrainRows, hp: dict) -> torch.Tensor:
    """[rows, classes] the teacher's logits for every training row, computed once."""
    teacher.to(DEVICE).eval()
    out = torch.empty(len(rows.data), teacher.config.num_labels)
    for batch in rows.loader(hp["batch_size"], seed=0, shuffle=False):
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=hp["precision"] == "bf16"):
            logits = teacher(**{k: v.to(DEVICE) for k, v in model_inputs(batch).items()}).logits
        out[batch["row"]] = logits.float().cpu()
    return out


def layers_student(teacher, layers: list[int], freeze_embeddings: bool):
    """The teacher with only the given transformer layers (the recipe's: the first K)."""
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[i]
                                                     for i in layers)
    student.config.num_hidden_layers = len(layers)
    if freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
    return student


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1), reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def distill_student(teacher, layers: list[int], rows: TrainRows, hp: dict, seed: int,
                    options: dict, cached: torch.Tensor | None = None):
    """A student of `layers`, trained with KD from the teacher online, or from `cached`
    (teacher_logits' output) when options["teacher"] is "cached". Returns it and its steps."""
    student = layers_student(teacher, layers, options["freeze_embeddings"])
    if options["teacher"] == "cached" and cached is None:
        raise ValueError("options['teacher'] is 'cached': pass the teacher_logits output")
    teacher.to(DEVICE).eval()

    def teacher_out(batch):
        if options["teacher"] == "cached":
            return cached[batch["row"].cpu()].to(DEVICE)
        with torch.no_grad():
            return teacher(**model_inputs(batch)).logits

    def loss_fn(model, batch):
        target = teacher_out(batch)
        logits = model(**model_inputs(batch)).logits
        return kd_loss(logits, target, batch["labels"], hp["temperature"], hp["alpha"])

    return train(student, rows, hp, seed, loss_fn, options)

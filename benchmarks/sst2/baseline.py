"""The plain recipe: the classic Hinton-style KD recipe of BERT distillation (Hinton, Vinyals
& Dean 2015), written the obvious way and kept that way on purpose: a Hugging Face model, a
PyTorch loop, inputs padded to max_length as `run_glue.py` does by default, a student made of
the teacher's first K layers, and the teacher run online at every step:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)

No kdscale code runs here; the benchmark times it against kdscale's pipeline and evaluates
its models on the same dev rows.
"""

from __future__ import annotations

import copy

import datasets
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    get_linear_schedule_with_warmup,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_train(path: str, tokenizer, max_length: int, max_examples: int | None):
    """The first `max_examples` rows of a label<TAB>sentence file, padded to max_length."""
    data = datasets.load_dataset("csv", data_files=path, delimiter="\t", quoting=3,
                                 split="train")
    if max_examples:
        data = data.select(range(min(max_examples, len(data))))
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, padding="max_length",
                                        max_length=max_length), batched=True)
    data = data.rename_column("label", "labels")
    return data.with_format("torch", columns=["input_ids", "attention_mask", "labels"])


def optimizer_and_schedule(model, lr: float, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)


def train(model, data, hp: dict, seed: int, loss_fn) -> torch.nn.Module:
    """`hp["epochs"]` epochs of AdamW over shuffled batches; loss_fn(model, batch) -> loss,
    under bf16 autocast when `hp["precision"]` is bf16 (the teacher's forward pass too)."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=hp["batch_size"], shuffle=True)
    optimizer, schedule = optimizer_and_schedule(model, hp["learning_rate"],
                                                 hp["epochs"] * len(loader))
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
    return model.eval()


def finetune_teacher(model_dir: str, data, hp: dict, seed: int):
    torch.manual_seed(seed)  # the new classifier head
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    return train(teacher, data, hp, seed, lambda model, batch: model(**batch).loss)


def first_layers_student(teacher, k: int):
    """The teacher with only its first k transformer layers."""
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = student.bert.encoder.layer[:k]
    student.config.num_hidden_layers = k
    return student


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1), reduction="batchmean")
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def distill_student(teacher, k: int, data, hp: dict, seed: int):
    student = first_layers_student(teacher, k)
    teacher.to(DEVICE).eval()

    def loss_fn(model, batch):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return kd_loss(logits, teacher_logits, batch["labels"], hp["temperature"], hp["alpha"])

    return train(student, data, hp, seed, loss_fn)

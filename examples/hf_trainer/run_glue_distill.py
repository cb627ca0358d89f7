"""Fine-tune a sequence classifier on a GLUE-style task in local files: a short, stock
`Trainer` script in the shape of transformers' text-classification/run_glue.py.

run_glue_distill.py is the same script with four lines changed (diff the two files): it
distills a teacher into the model, from a logit cache or from the teacher itself.

    python run_glue.py --model_name_or_path bert-base-uncased --train_file train.csv \
        --validation_file dev.csv --output_dir out --do_train --do_eval
    accelerate launch run_glue_distill.py --model_name_or_path student --train_file train.csv \
        --output_dir out --do_train --kd_cache runs/sst2/cache --deepspeed ds_zero2.json
"""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from kdscale.hf import DistillationTrainer, DistillationTrainingArguments, end_process
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
            ".jsonl": ("json", {})}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub name or local model directory."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Default: the model's."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "csv, tsv, json or jsonl with text and labels."})
    validation_file: str | None = field(default=None, metadata={"help": "Same columns."})
    text_column: str = field(default="sentence", metadata={"help": "The (first) text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Pair tasks: B."})
    label_column: str = field(default="label", metadata={"help": "The class of each row."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N."})


def load_split(path: str) -> datasets.Dataset:
    builder, options = BUILDERS[Path(path).suffix]
    return datasets.load_dataset(builder, data_files=path, split="train", **options)


def tokenize(raw: datasets.Dataset, tokenizer, data_args: DataArguments, label_ids: dict):
    def preprocess(batch):
        pairs = batch[data_args.text_pair_column] if data_args.text_pair_column else None
        result = tokenizer(batch[data_args.text_column], pairs, truncation=True,
                           max_length=data_args.max_seq_length)
        result["label"] = [label_ids[label] for label in batch[data_args.label_column]]
        return result

    return raw.map(preprocess, batched=True, desc="tokenizing")


def accuracy(prediction) -> dict:
    predicted = np.argmax(prediction.predictions, axis=-1)
    return {"accuracy": float((predicted == prediction.label_ids).mean())}


def run(trainer: Trainer, training_args: TrainingArguments) -> None:
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    train = load_split(data_args.train_file)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    labels = sorted(set(train[data_args.label_column]))
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name
                                              or model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(labels),
        # Saved in config.json: which output is which class, for whoever reads the model next.
        id2label={i: str(label) for i, label in enumerate(labels)},
        label2id={str(label): i for i, label in enumerate(labels)})
    with training_args.main_process_first(desc="tokenizing"):
        train_dataset = tokenize(train, tokenizer, data_args, label_ids)
        eval_dataset = None
        if data_args.validation_file:
            raw_eval = load_split(data_args.validation_file)
            eval_dataset = tokenize(raw_eval, tokenizer, data_args, label_ids)
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    run(trainer, training_args)


if __name__ == "__main__":
    main()
    end_process()

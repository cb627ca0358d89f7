"""`kdscale cache`: run the fine-tuned teacher over the training data once and store its raw
logits in a LogitCache, keyed by example id."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kdscale.cache import CacheWriter, LogitCache, read_manifest
from kdscale.cache.format import MANIFEST_NAME
from kdscale.config import Config
from kdscale.data import PaddingCollator, check_sources, make_loader, prepare
from kdscale.models import (
    label_names,
    load_classifier,
    load_tokenizer,
    tokenizer_sha256,
    weights_sha256,
)
from kdscale.train import model_inputs, process_state


def cache_is_current(config: Config, fingerprints: dict) -> bool:
    """True when a complete cache for this teacher and data is already there."""
    if not (config.cache_dir / MANIFEST_NAME).is_file():
        return False
    manifest = read_manifest(config.cache_dir)
    current = (manifest.data_fingerprint == fingerprints["data_fingerprint"]
               and manifest.teacher.get("weights_sha256") == fingerprints["teacher_sha256"])
    if not current and not config.cache.overwrite:
        LogitCache(config.cache_dir).check_compatible(**fingerprints)  # raises, naming what differs
    return current


@torch.inference_mode()
def write_logits(teacher: torch.nn.Module, loader, writer: CacheWriter,
                 device: torch.device) -> None:
    teacher.eval().to(device)
    for batch in tqdm(loader, desc="teacher logits"):
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        writer.add(batch["example_id"], teacher(**inputs).logits.float().cpu())


def run_cache(config: Config) -> None:
    check_sources(config.data)
    state = process_state()
    if state.num_processes > 1:
        # Sharding the teacher's work over ranks is the distributed cache's job; until then
        # the main process writes the whole cache and the others wait for it.
        state.print("note: the cache is written by the main process alone")
    if state.is_main_process:
        build_cache(config)
    state.wait_for_everyone()


def build_cache(config: Config) -> None:
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher = load_classifier(config.teacher_dir, "teacher")
    train = prepare(config.data, tokenizer, "train", label_names(teacher))
    fingerprints = {"data_fingerprint": train.fingerprint,
                    "teacher_sha256": weights_sha256(teacher),
                    "tokenizer_sha256": tokenizer_sha256(tokenizer)}
    if cache_is_current(config, fingerprints):
        print(f"cache {config.cache_dir} is complete for this teacher and data; nothing to do")
        return
    print(f"caching {len(train.dataset)} examples x {teacher.config.num_labels} logits "
          f"({config.cache.dtype}) to {config.cache_dir}")
    loader = make_loader(train, config.cache.batch_size, PaddingCollator(tokenizer.pad_token_id),
                         shuffle=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with CacheWriter(config.cache_dir, num_outputs=teacher.config.num_labels,
                     dtype=config.cache.dtype, shard_rows=config.cache.shard_rows,
                     teacher={"name": str(config.teacher_dir),
                              "weights_sha256": fingerprints["teacher_sha256"]},
                     tokenizer_sha256=fingerprints["tokenizer_sha256"],
                     data_fingerprint=train.fingerprint, overwrite=True) as writer:
        write_logits(teacher, loader, writer, device)

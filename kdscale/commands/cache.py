"""`kdscale cache`: every process runs the teacher over its shards of the training data and
writes them; the main process then writes the manifest. Rerunning the same command after a
crash skips the finished shards.

    accelerate launch --multi_gpu --num_processes 2 -m kdscale cache --config exp.yaml
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.compute
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from kdscale.cache import (
    CacheError,
    clear_partial,
    finalize_cache,
    finished_shards,
    read_manifest,
)
from kdscale.cache.audit import FidelityAudit, describe
from kdscale.cache.building import (
    build_lock,
    check_shard_fits,
    max_over_processes,
    staging_dir,
    swap_in,
)
from kdscale.cache.format import MANIFEST_NAME, shard_plan_id
from kdscale.cache.plan import ShardPlan, plan_id, plan_shards
from kdscale.cache.rows import join_shard_tensors, shard_tensors
from kdscale.cache.sizes import row_bytes
from kdscale.cache.verify import damaged_shards, reopen_for_repair
from kdscale.cache.writer import resolve_index_dtype, write_shard_tensors
from kdscale.config import Config, ConfigError
from kdscale.config.schedules import Schedule
from kdscale.data import TaskData, check_sources, check_unknown_rate
from kdscale.data.batch import IGNORE_INDEX
from kdscale.distributed import process_state, processes_on_this_machine
from kdscale.files import check_writable
from kdscale.models import (
    check_inputs_fit,
    checkpoint_sha256,
    load_tokenizer,
    num_layers_of,
    tokenizer_sha256,
)
from kdscale.tasks import CacheLayout, Task, cache_entries, get_task
from kdscale.tasks.base import full_rows
from kdscale.teacher import TeacherRunner, check_teacher_deepspeed_config, load_runner


@dataclass
class CacheJob:
    """What every process agrees on before the first forward."""
    config: Config
    data: TaskData
    plan: ShardPlan
    plan_id: str
    meta: dict  # manifest fields: kind, num_outputs, k, dtype, teacher, tokenizer, data
    tokenizer: PreTrainedTokenizerBase
    task: Task
    layout: CacheLayout
    # Where shards are written: the cache folder, or a folder beside it while a complete
    # cache of other settings stays in place until the new one is finished.
    directory: Path | None = None

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


def run_cache(config: Config) -> None:
    check_sources(get_task(config.task).data_config(config))
    check_teacher_deepspeed_config(config.teacher)
    check_writable(config.cache_dir, "cache.dir")
    state = process_state()
    with build_lock(config.cache_dir, state):
        job = plan_job(config, state)
        differs = _differences(job)
        damaged = _damaged(job) if differs == [] else {}
        if differs == [] and not damaged:
            state.print(f"cache {config.cache_dir} is complete for this teacher and data, "
                        f"every shard whole; nothing to do")
            return
        # The teacher loads before anything is refused or removed: a damaged teacher is named
        # as such, never mistaken for another one, and never costs the cache it would replace.
        runner = load_runner(config, state, config.cache.batch_size)
        if differs and not config.cache.overwrite:
            raise CacheError(f"cache {config.cache_dir} holds {', '.join(differs)}; set "
                             f"--cache.overwrite true to replace it (it is kept until the new "
                             f"cache is complete), or choose another --cache.dir")
        _build(job, runner, state, differs, damaged)


def _build(job: CacheJob, runner: TeacherRunner, state, differs: list[str] | None,
           damaged: dict[int, str]) -> None:
    config = job.config
    # In place: a new cache, or a repair of shards this plan wrote. Beside, then swapped in:
    # a cache of other settings, or a damaged one of another shard plan (cache.shard_rows).
    in_place = differs is None or (damaged and _same_plan(job, damaged))
    job.directory = config.cache_dir if in_place else staging_dir(config.cache_dir)
    if damaged:
        state.print(f"cache {config.cache_dir}: rewriting damaged shard(s) "
                    f"{', '.join(f'{i} ({why})' for i, why in damaged.items())}")
    if state.is_main_process and damaged and in_place:
        reopen_for_repair(config.cache_dir, read_manifest(config.cache_dir), damaged,
                          job.plan_id)
    if state.is_main_process:
        _prepare_directory(job)
    state.wait_for_everyone()
    done = finished_shards(job.directory, job.plan_id)
    mine = [s for s in job.plan.shards_of(state.process_index, state.num_processes)
            if s not in done]
    state.print(f"{len(job.plan.shards)} shards of {config.cache.shard_rows} rows, "
                f"{len(done)} already finished; {state.num_processes} process(es)")
    audit = new_audit(job) if state.is_main_process else None
    stats = write_shards(job, runner, mine, state, audit)
    state.wait_for_everyone()
    all_stats = _gather(stats, state)
    if state.is_main_process:
        manifest = finalize_cache(job.directory, num_shards=len(job.plan.shards),
                                  plan_id=job.plan_id, audit=audit and audit.result(),
                                  **job.meta)
        if job.directory != config.cache_dir:
            swap_in(job.directory, config.cache_dir)
        report_numbers(job, manifest, all_stats, runner)
    state.wait_for_everyone()


def plan_job(config: Config, state) -> CacheJob:
    num_layers_of(config.teacher_dir)  # a clear error where there is no teacher yet
    task = get_task(config.task)
    tokenizer = load_tokenizer(config.teacher_dir)
    teacher_config = AutoConfig.from_pretrained(str(config.teacher_dir))
    check_inputs_fit(teacher_config, tokenizer, config.data.max_length, "the teacher")
    with state.main_process_first():  # one process tokenizes; the rest read its cache files
        data = task.transfer_set(config, tokenizer, task.label_names(teacher_config))
    check_unknown_rate(data, tokenizer, f"the tokenizer of {config.teacher_dir}")
    cache, layout = config.cache, task.cache_layout(config, teacher_config)
    if layout.kind == "dense" and cache.dtype == "int8":
        raise ConfigError(f"cache.dtype: task {config.task} caches dense rows, which int8 "
                          f"does not store (its codes are for top-k rows); expected float16, "
                          f"bfloat16 or float32, got 'int8'")
    meta = {**layout.meta(), "dtype": cache.dtype,
            # lossless, so never a setting; in the plan id, so a rerun never mixes widths
            "index_dtype": resolve_index_dtype(layout.kind, layout.num_outputs, None),
            "teacher": {"name": str(config.teacher_dir),
                        "weights_sha256": checkpoint_sha256(config.teacher_dir)},
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "data_fingerprint": data.fingerprint, "max_length": config.data.max_length}
    if meta["k"] is not None and meta["k"] > meta["num_outputs"]:
        raise CacheError(f"cache.k: expected at most the teacher's {meta['num_outputs']} "
                         f"outputs, got {meta['k']}")
    plan = plan_shards([len(ids) for ids in data.dataset["input_ids"]], cache.shard_rows)
    identity = plan_id(shard_rows=cache.shard_rows, **meta)
    return CacheJob(config, data, plan, identity, meta, tokenizer, task, layout,
                    config.cache_dir)






def _differences(job: CacheJob) -> list[str] | None:
    """None where the folder holds no complete cache; else what differs from this job (an
    empty list: the cache is complete for this teacher, data and settings)."""
    directory = job.config.cache_dir
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        manifest, meta = read_manifest(directory), job.meta
    except CacheError as err:
        return [f"a damaged manifest ({err})"]
    checks = {  # what the refusal names: "cache X holds <these>"
        "logits of other teacher weights": manifest.teacher.get("weights_sha256")
        == meta["teacher"]["weights_sha256"],
        "logits of other data": manifest.data_fingerprint == meta["data_fingerprint"],
        "logits of another tokenizer's inputs":
            manifest.tokenizer_sha256 == meta["tokenizer_sha256"],
        "other settings (kind, k, dtype, masking)":
            (manifest.kind, manifest.k, manifest.dtype, manifest.masking)
            == (meta["kind"], meta["k"], meta["dtype"], meta["masking"]),
    }
    return [what for what, same in checks.items() if not same]


def _damaged(job: CacheJob) -> dict[int, str]:
    """Shards of a complete cache of this job that are not whole; every process reads the
    same answer from the same files."""
    directory = job.config.cache_dir
    return damaged_shards(directory, read_manifest(directory))


def _same_plan(job: CacheJob, damaged: dict[int, str]) -> bool:
    """The whole shards were cut by this job's plan, so they can stand beside rewritten ones."""
    manifest = read_manifest(job.config.cache_dir)
    return all(shard_plan_id(job.config.cache_dir / shard["file"]) == job.plan_id
               for i, shard in enumerate(manifest.shards) if i not in damaged)






def _prepare_directory(job: CacheJob) -> None:
    """Start clean where the folder holds shards of another plan (unfinished: a complete
    cache is never built over, see `run_cache`)."""
    directory = job.directory
    directory.mkdir(parents=True, exist_ok=True)
    try:
        finished_shards(directory, job.plan_id)
    except CacheError:  # shards of another plan; refused unless overwrite
        if not job.config.cache.overwrite:
            raise
        clear_partial(directory)


def new_audit(job: CacheJob) -> FidelityAudit | None:
    """A top-k cache that drops outputs is audited, at the loss's temperature (a schedule's
    start)."""
    layout = job.layout
    if layout.kind != "topk" or layout.k >= layout.num_outputs:
        return None
    kind = ("sampled" if layout.sampling else "topk_tail" if layout.tail_temperature
            else "topk")
    return FidelityAudit(layout.k, Schedule.from_value(job.config.loss.temperature).value(0, 1),
                         kind=kind, dtype=job.meta["dtype"])


def write_shards(job: CacheJob, runner: TeacherRunner, shards: list[int], state,
                 audit: FidelityAudit | None = None) -> dict:
    """Run the teacher over this process's shards; every process runs the same number of
    forwards (ZeRO-3 gathers each layer from all of them), padding with a repeat batch."""
    batch_size = job.config.cache.batch_size
    steps = [(s, b) for s in shards for b in job.plan.batches(s, batch_size)]
    total = len(steps)
    if runner.placement != "replicate":
        total = max_over_processes(total, state)
    collate = job.task.collator(job.tokenizer)
    progress = _progress(total * job.config.cache.batch_size, state)
    start, rows_done, pending, examples = time.perf_counter(), 0, {}, {}
    for step in range(total):
        if step >= len(steps):
            runner.outputs(collate(job.data.rows(job.plan.shards[0][:1])))  # lockstep only
            continue
        shard, batch_rows = steps[step]
        batch = collate(job.data.rows(batch_rows))
        with torch.inference_mode(), job.task.head_context(runner.model, batch):
            outputs = runner.outputs(batch)
            entries = cache_entries(job.task, job.layout, outputs, batch)
            if audit is not None:
                audit.add(full_rows(job.task, job.layout, outputs, batch))
        pending.setdefault(shard, []).append(stored(job, entries))
        if step == 0:
            check_memory(job, shards, pending[shard][0], state)
        examples[shard] = examples.get(shard, 0) + len(batch_rows)
        rows_done += len(batch_rows)
        progress.update(len(batch_rows) * state.num_processes)
        if examples[shard] == len(job.plan.shards[shard]):
            _write(job, shard, pending.pop(shard))
    progress.close()
    seconds = time.perf_counter() - start
    return {"rank": state.process_index, "examples": rows_done, "seconds": round(seconds, 3),
            "params_held": runner.params_held}


def stored(job: CacheJob, entries: dict) -> dict:
    """A batch's entries checked and cast to the cache's dtypes now: a bad row fails at its
    batch, and a shard fills at its stored size."""
    meta = job.meta
    return shard_tensors(entries["example_ids"], entries.get("logits"), entries.get("values"),
                         entries.get("indices"), entries.get("positions"),
                         entries.get("empty_ids"), dtype=meta["dtype"],
                         num_outputs=meta["num_outputs"], k=meta["k"], tail=entries.get("tail"),
                         index_dtype=meta["index_dtype"])


def check_memory(job: CacheJob, shards: list[int], first: dict, state) -> None:
    """This process's largest shard, at the bytes a row of its first stored batch takes,
    against its share of the free memory (kdscale.cache.building.check_shard_fits)."""
    rows = {shard: cached_rows(job, shard) for shard in shards}
    largest = max(rows, key=rows.get)
    check_shard_fits(first, rows[largest], len(job.plan.shards[largest]),
                     processes_on_this_machine(state.num_processes),
                     psutil.virtual_memory().available)


def cached_rows(job: CacheJob, shard: int) -> int:
    """The rows shard `shard` holds: one an example, or one a labelled position."""
    examples = job.plan.shards[shard]
    if not job.layout.per_position:
        return len(examples)
    labels = job.data.dataset.select(examples).with_format("arrow")["labels"]
    return pyarrow.compute.sum(pyarrow.compute.not_equal(
        pyarrow.compute.list_flatten(labels), IGNORE_INDEX)).as_py() or 0


def _write(job: CacheJob, shard: int, parts: list[dict]) -> None:
    """One shard from its batches' stored rows, in batch order (an example's rows stay
    contiguous); the batches are let go once joined."""
    joined = join_shard_tensors(parts)
    parts.clear()
    write_shard_tensors(job.directory, shard, joined, plan_id=job.plan_id)


def _gather(stats: dict, state) -> list[dict]:
    if state.num_processes == 1:
        return [stats]
    gathered = [None] * state.num_processes
    torch.distributed.all_gather_object(gathered, stats)
    return gathered


def _progress(total: int, state):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="teacher logits", unit="ex", disable=not state.is_main_process)


def position_bytes(manifest) -> int:
    """Bytes of one row of a per-position cache, by the formula of kdscale.cache.sizes."""
    return row_bytes(kind=manifest.kind, num_outputs=manifest.num_outputs, k=manifest.k,
                     dtype=manifest.dtype, index_dtype=manifest.index_dtype, per_position=True,
                     tail=manifest.tail_temperature is not None)


def report_numbers(job: CacheJob, manifest, stats: list[dict], runner: TeacherRunner) -> None:
    on_disk = sum(s["bytes"] for s in manifest.shards)
    rows = manifest.num_examples
    print(f"cache {job.config.cache_dir}: {rows} examples in {len(manifest.shards)} shards, "
          f"{on_disk / 2**20:.2f} MiB on disk, {on_disk / max(rows, 1):.1f} bytes/example")
    if job.layout.per_position:  # masked tokens or word starts: the unit that grows
        print(f"  {manifest.num_rows} positions, {on_disk / max(manifest.num_rows, 1):.1f} "
              f"bytes/position (top-{manifest.k} of {manifest.num_outputs}: {manifest.dtype} "
              f"values, {manifest.index_dtype} indices, {position_bytes(manifest)} bytes a "
              f"row, the rest per example and per shard)")
    for s in stats:
        rate = s["examples"] / s["seconds"] if s["seconds"] else 0.0
        print(f"  rank {s['rank']}: {s['examples']} examples in {s['seconds']:.1f} s "
              f"({rate:.1f} ex/s), holds {s['params_held']:,} of {runner.num_params:,} "
              f"teacher parameters")
    if manifest.audit:
        print(describe(manifest.audit))
    build = {"placement": runner.placement, "num_params": runner.num_params,
             "world_size": len(stats), "ranks": stats}
    (job.config.cache_dir / "build.json").write_text(json.dumps(build, indent=1))

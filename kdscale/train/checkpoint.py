"""Checkpoints a killed job resumes from exactly.

`<root>/step-00000120/` holds what `Accelerator.save_state` writes (model, optimizer,
scheduler, and the random state of every process) plus `trainer_state.json` (the step, the
epoch and how many of its batches were trained, the loss history). The `COMPLETE` marker
is written last, after every process has finished writing: a checkpoint without it is a
job that died while saving, and is never loaded.

`trainer_state.json` also records the launch that wrote it (processes, rows per process,
accumulation, DeepSpeed or not). The data order and every step depend on the global batch
(processes x rows per process), not on the number of processes, so a checkpoint resumes under
another world size with the same global batch (a process the checkpoint has no random state
for starts from its random seed: dropout masks differ, the optimization does not); under
DeepSpeed, whose ZeRO optimizer state is partitioned by process, only under the same world
size.
`check_resume` refuses the rest at start, before anything is written.

Nothing in a checkpoint is unpickled before `check_pickles` has read the names each pickle
would import: DeepSpeed loads its files with `torch.load(weights_only=False)`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from kdscale.config import TrainConfig
from kdscale.distributed import timed_out
from kdscale.errors import KdscaleError
from kdscale.files import write_json_atomic

COMPLETE = "COMPLETE"
_NAME = re.compile(r"step-(\d{8})")
_DISCARDED = ".discarded-"  # a checkpoint being deleted; never a resume candidate
_PICKLES = {".bin", ".pt", ".pth", ".pkl"}
# What a checkpoint's pickles may import besides tensors and plain containers: the numpy
# random states accelerate saves and the small classes in DeepSpeed's optimizer states.
SAFE_GLOBALS = frozenset({
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum"})


class CheckpointWriteError(KdscaleError):
    """A checkpoint that could not be written whole."""


class ResumeError(KdscaleError):
    """A checkpoint this run cannot resume from; the message names it and what differs."""


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches of this epoch already trained


def checkpoint_root(output_dir: str | Path, section: str) -> Path:
    """Where a command's checkpoints live: <output_dir>/checkpoints/<finetune|distill>."""
    return Path(output_dir) / "checkpoints" / section


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints with their marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator: Accelerator, root: Path, progress: Progress,
                    history: list[dict], keep: int, batch_size: int | None = None,
                    run: dict | None = None) -> Path:
    """`batch_size`: rows per process, recorded so a resume can check the global batch;
    `run`: the settings that make this run what it is (see `check_same_run`)."""
    path = root / f"step-{progress.step:08d}"
    try:
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()  # every process's files are there before the marker
        if accelerator.is_main_process:
            launch = {"processes": accelerator.num_processes, "batch_size": batch_size,
                      "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                      "deepspeed": accelerator.state.deepspeed_plugin is not None}
            state = {"progress": asdict(progress), "history": history, "launch": launch,
                     "run": run}
            write_json_atomic(path / "trainer_state.json", state)
            (path / COMPLETE).write_text(f"step {progress.step}\n")
            _prune(root, keep)
    except (OSError, RuntimeError, SafetensorError) as err:
        # A full disk or a file size limit (torch.save reports it as a RuntimeError): the
        # checkpoint has no COMPLETE marker, so it is never loaded; say so in one line.
        if timed_out(err):  # a collective timeout keeps its own message (kdscale.cli)
            raise
        cause = getattr(err, "strerror", None) or str(err).strip().splitlines()[0]
        raise CheckpointWriteError(f"could not write checkpoint {path}: {cause} (is the disk "
                                   f"full?); it is incomplete and will be ignored: free space "
                                   f"and rerun to resume from the previous checkpoint") from err
    accelerator.wait_for_everyone()
    return path


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unfinished ones.

    A checkpoint is first renamed out of the `step-*` names, then deleted: a job killed in
    the middle of a deletion (the launcher's SIGKILL after its grace period) must not leave
    a directory that still has its COMPLETE marker but has lost its weights."""
    complete = complete_checkpoints(root)
    newest = complete[-1].name if complete else ""
    for path in sorted(root.iterdir()):
        if path.name.startswith(_DISCARDED):  # left by a deletion a kill interrupted
            shutil.rmtree(path, ignore_errors=True)
        elif _NAME.fullmatch(path.name) and (
                path in complete[:-keep] or (path not in complete and path.name < newest)):
            discarded = path.rename(root / f"{_DISCARDED}{path.name}")
            shutil.rmtree(discarded, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[Progress, list[dict]]:
    state = read_state(path)
    check_pickles(path)
    try:
        accelerator.load_state(str(path))
    except (ValueError, RuntimeError, KeyError) as err:  # torch's load_state_dict mismatches
        raise ResumeError(f"checkpoint {path} does not fit this run's model or optimizer: it was "
                          f"written with other trainable parameters (student.layers, "
                          f"student.freeze_embeddings, the losses' projections, ...). Resume "
                          f"with the settings that wrote it, or use another output_dir "
                          f"({type(err).__name__}: {str(err)[:200]})") from err
    return Progress(**state["progress"]), state["history"]


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        Progress(**state["progress"])
        ok = isinstance(state["history"], list)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ResumeError(f"checkpoint {path} is marked complete but its trainer_state.json "
                          f"is missing or damaged; expected {{\"progress\", \"history\"}} as "
                          f"written by kdscale. Remove the checkpoint to resume from an older one")
    return state


def check_pickles(path: Path) -> None:
    """Refuses a checkpoint whose pickles would import anything but SAFE_GLOBALS (or plain
    tensors), by reading the names without unpickling."""
    for file in sorted(p for p in path.rglob("*") if p.suffix in _PICKLES and p.is_file()):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as err:
            raise ResumeError(f"checkpoint {path}: {file.relative_to(path)} is not a file "
                              f"torch.save wrote ({err}); refused") from None
        unsafe = sorted(set(names) - SAFE_GLOBALS)
        if unsafe:
            raise ResumeError(f"checkpoint {path}: {file.relative_to(path)} would import "
                              f"{unsafe} when loaded; refused (a checkpoint holds tensors, "
                              f"numbers and {sorted(SAFE_GLOBALS)} only)")


def check_same_run(path: Path, run: dict | None) -> None:
    """A checkpoint resumes only the run that wrote it: the same model, layers, data, losses,
    optimizer and schedule (`run`, a flat {key: value}); names the keys that differ."""
    stored = read_state(path).get("run")
    if not stored or run is None:  # written before runs were recorded, or not asked
        return
    current = json.loads(json.dumps(run))  # as it would read back: lists, not tuples
    differ = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if differ:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
                          for k in differ[:4])
        raise ResumeError(f"checkpoint {path} was written by a run with other settings "
                          f"({', '.join(differ)} differ: {shown}). Resume with the settings "
                          f"that wrote it, or use another output_dir")


def check_resume(root: Path, train: TrainConfig, section: str, processes: int,
                 deepspeed: bool) -> None:
    """The checkpoint a rerun would resume from, checked before anything is written."""
    complete = complete_checkpoints(root)
    if not complete:
        return
    path = complete[-1]
    launch = read_state(path).get("launch")
    check_pickles(path)
    if not launch:  # written before launches were recorded
        return
    if launch["deepspeed"] != deepspeed or (deepspeed and launch["processes"] != processes):
        kind = "DeepSpeed ZeRO" if launch["deepspeed"] else "plain (no DeepSpeed)"
        raise ResumeError(f"checkpoint {path} holds {kind} state of {launch['processes']} "
                          f"process(es); this run has {processes} process(es) "
                          f"{'under' if deepspeed else 'without'} DeepSpeed. ZeRO partitions "
                          f"the optimizer state by process: resume with the launch that wrote "
                          f"it, or use another output_dir")
    _check_global_batch(path, launch, train, section, processes)


def _check_global_batch(path: Path, launch: dict, train: TrainConfig, section: str,
                        processes: int) -> None:
    accumulation = launch["gradient_accumulation_steps"]
    if accumulation != train.gradient_accumulation_steps:
        raise ResumeError(f"{section}.gradient_accumulation_steps: expected {accumulation}, "
                          f"as checkpoint {path} was written with, got "
                          f"{train.gradient_accumulation_steps}")
    if launch["batch_size"] is None:
        return
    theirs, ours = launch["batch_size"] * launch["processes"], train.batch_size * processes
    if theirs != ours:
        hint = (f"{section}.batch_size {theirs // processes} resumes it on {processes} "
                f"process(es)" if theirs % processes == 0 else "use the launch that wrote it")
        raise ResumeError(f"checkpoint {path} was written with a global batch of {theirs} rows "
                          f"({launch['processes']} process(es) x {section}.batch_size "
                          f"{launch['batch_size']}); this run has {ours} ({processes} x "
                          f"{train.batch_size}). The data order and every step depend on the "
                          f"global batch: {hint}, or use another output_dir")

"""Checkpoints a killed job resumes from exactly.

`<root>/step-00000120/` holds what `Accelerator.save_state` writes (model, optimizer,
scheduler, and the random state of every process) plus `trainer_state.json` (the step, the
epoch and how many of its batches were trained, the loss history). The `COMPLETE` marker
is written last, after every process has finished writing: a checkpoint without it is a
job that died while saving, and is never loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from kdscale.cache.files import write_json_atomic

COMPLETE = "COMPLETE"
_NAME = re.compile(r"step-(\d{8})")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches of this epoch already trained


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints with their marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator: Accelerator, root: Path, progress: Progress,
                    history: list[dict], keep: int) -> Path:
    path = root / f"step-{progress.step:08d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()  # every process's files are there before the marker
    if accelerator.is_main_process:
        state = {"progress": asdict(progress), "history": history}
        write_json_atomic(path / "trainer_state.json", state)
        (path / COMPLETE).write_text(f"step {progress.step}\n")
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return path


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unfinished ones."""
    complete = complete_checkpoints(root)
    newest = complete[-1].name if complete else ""
    for path in root.iterdir():
        if not _NAME.fullmatch(path.name):
            continue
        stale = path in complete[:-keep] or (path not in complete and path.name < newest)
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[Progress, list[dict]]:
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    return Progress(**state["progress"]), state["history"]

"""Where a result came from: the commit of the code that measured it, and whether the working
tree had changes not in that commit (a figure from a dirty tree names no code exactly).

A benchmark can run for an hour, and results are written at its end: the state is taken when
this module is first imported (every benchmark imports it before it starts measuring), and the
record also says whether the commit or the tracked files changed while the run went on.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def tree_state() -> dict:
    """The commit, whether tracked files differ from it, and a digest of that difference."""
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD")
    return {"commit": commit or None, "clean_tree": bool(commit) and diff == "",
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()}


_AT_START = tree_state()


def provenance() -> dict:
    """The state the run started from, and `changed_during_run`: whether a commit or an edit of
    a tracked file happened before this call (the code that ran is then not exactly named)."""
    start = {key: _AT_START[key] for key in ("commit", "clean_tree")}
    return {**start, "changed_during_run": tree_state() != _AT_START}

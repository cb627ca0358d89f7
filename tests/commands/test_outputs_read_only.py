"""An output folder that cannot be written (read-only, or a file where a folder is expected)
is refused at start, naming the key, before any work: the previous student, report or file
there stays byte for byte."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kdscale.errors import KdscaleError
from tests.support.bad_input import changed, copy_tree, run_command, snapshot, write_experiment


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for this process: root writes through permission bits, so
    for root the folder is made immutable (chattr +i) instead of mode 0555."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)]).returncode != 0:
            pytest.skip("root, and this file system cannot mark a folder immutable")
        undo = lambda: subprocess.run([chattr, "-i", str(folder)], check=True)  # noqa: E731
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        undo = lambda: folder.chmod(mode)  # noqa: E731
    try:
        assert not _writable(folder), f"{folder} is still writable"
        yield folder
    finally:
        undo()


@pytest.mark.parametrize("command", ["distill", "eval"])
def test_a_read_only_output_folder_is_refused_before_any_work(pipe, tmp_path, command):
    run = copy_tree(pipe / "run", tmp_path / "run")
    shutil.rmtree(run / "checkpoints")  # distill would otherwise resume, not start
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(run))
    if command == "eval":
        run_command("eval", config)  # a report to keep
    before = snapshot(run)
    with read_only(run), pytest.raises(KdscaleError) as raised:
        run_command(command, config)
    assert f"output_dir: cannot write in {run}" in str(raised.value)
    assert "expected a writable folder" in str(raised.value)
    assert changed(before, snapshot(run)) == []


def test_a_demo_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    from kdscale.cli import main

    target = tmp_path / "notes.txt"
    target.write_text("the user's notes")
    assert main(["demo", "--output_dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--output_dir: {target} is a file; expected a folder" in err
    assert "Traceback" not in err
    assert target.read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

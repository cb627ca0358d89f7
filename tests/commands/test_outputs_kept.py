"""An output that fails to write (a full disk, stood in for by a real file size limit) leaves
the previous one whole, byte for byte: a student, a teacher, a report. Every write goes beside
its final name and is renamed over it only when complete."""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal

import pytest

from kdscale.errors import KdscaleError
from kdscale.files import replace_directory, write_files_atomic
from tests.support.bad_input import changed, copy_tree, run_command, snapshot, write_experiment

LIMIT_BYTES = 4096  # below any model's weights file and the report's plot


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as they would on a full disk (SIGXFSZ,
    which would kill the process instead, is ignored for the block)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _run_over_a_good_one(pipe, tmp_path, command: str, **sections):
    """The finished run's folder without its checkpoints: the command trains anew over it."""
    run = copy_tree(pipe / "run", tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(run),
                              **sections)
    return run, config


@pytest.mark.parametrize("command, sections, fragment", [
    ("distill", {"distill": {"max_steps": 3, "checkpoint_every": None}}, "could not write"),
    ("distill", {"distill": {"max_steps": 3}}, "could not write checkpoint"),
    ("eval", {}, "report"),
])
def test_a_failed_write_keeps_the_previous_output(pipe, tmp_path, command, sections, fragment):
    run, config = _run_over_a_good_one(pipe, tmp_path, command, **sections)
    if command == "eval":
        run_command("eval", config)  # a good report to keep
    before = snapshot(run)
    with file_size_limit(LIMIT_BYTES), pytest.raises((KdscaleError, OSError)) as raised:
        run_command(command, config)
    assert fragment in str(raised.value)
    after = snapshot(run)
    kept = {path: digest for path, digest in after.items() if path in before}
    assert changed(before, kept) == []  # files may be added (logs), none changed or lost
    assert not [p for p in after if "/.student.new-" in p or "/.report" in p]


def test_a_failed_finetune_keeps_the_previous_teacher(pipe, tmp_path):
    teacher = copy_tree(pipe / "teacher", tmp_path / "teacher")
    config = write_experiment(pipe, tmp_path / "experiment.yaml", output_dir=str(tmp_path / "o"),
                              teacher={"checkpoint": str(teacher), "config": {
                                  "vocab_size": 114, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 16},
                                  "tokenizer": str(pipe / "teacher")},
                              finetune={"max_steps": 2, "report_to": "none"})
    before = snapshot(teacher)
    with file_size_limit(LIMIT_BYTES), pytest.raises(KdscaleError, match="could not write"):
        run_command("finetune", config)
    assert changed(before, snapshot(teacher)) == []


def test_replace_directory_swaps_only_a_complete_build(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")

    def half_written(folder):
        (folder / "weights").write_text("new, half")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        replace_directory(target, half_written)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    replace_directory(target, lambda folder: (folder / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_files_that_belong_together_are_replaced_together(tmp_path):
    old = {tmp_path / "report.json": b"{}", tmp_path / "report.md": b"# old"}
    write_files_atomic(old)
    with file_size_limit(LIMIT_BYTES), pytest.raises(OSError):
        write_files_atomic({tmp_path / "report.json": b"{new}",
                            tmp_path / "report.md": b"x" * (2 * LIMIT_BYTES)})
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]

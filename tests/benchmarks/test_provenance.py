"""A result names the code that measured it: the state when the run began, and whether the
tree moved while it ran."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks import provenance as prov


def git(repo, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    monkeypatch.setattr(prov, "REPO", tmp_path)
    monkeypatch.setattr(prov, "_AT_START", prov.tree_state())
    return tmp_path


def test_an_untouched_tree_names_its_commit(repo):
    record = prov.provenance()
    assert record == {"commit": git(repo, "rev-parse", "HEAD"), "clean_tree": True,
                      "changed_during_run": False}


def test_an_edit_during_the_run_is_recorded_against_the_starting_commit(repo):
    start = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("x = 2\n")
    assert prov.provenance() == {"commit": start, "clean_tree": True, "changed_during_run": True}


def test_a_commit_during_the_run_is_recorded_against_the_starting_commit(repo):
    start = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("x = 2\n")
    git(repo, "commit", "-q", "-am", "two")
    record = prov.provenance()
    assert record["commit"] == start and record["changed_during_run"]


def test_a_dirty_start_is_not_clean(repo, monkeypatch):
    (repo / "code.py").write_text("x = 3\n")
    monkeypatch.setattr(prov, "_AT_START", prov.tree_state())
    assert prov.provenance()["clean_tree"] is False
    (repo / "code.py").write_text("x = 4\n")  # another edit of the same file still counts
    assert prov.provenance()["changed_during_run"] is True

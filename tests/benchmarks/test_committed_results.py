"""Every committed benchmark result says which commit measured it.

A figure is only a result when it can be traced to the code that produced it: a run
records `commit` (and whether the tree was clean); figures from before that rule carry a
`provenance` block labelling them historical, with the commit that added them.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHA = re.compile(r"^[0-9a-f]{7,40}$")


def committed_results():
    found = []
    for top in ("benchmarks", "kernels"):
        for path in sorted((ROOT / top).rglob("*.json")):
            if any(part.startswith("results") for part in path.relative_to(ROOT).parts):
                found.append(path)
    return found


def test_results_exist_to_check():
    assert len(committed_results()) >= 5


@pytest.mark.parametrize("path", committed_results(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_result_names_its_commit(path):
    record = json.loads(path.read_text())
    if "commit" in record:
        assert SHA.match(record["commit"]), f"{path}: commit {record['commit']!r}"
        assert isinstance(record.get("clean_tree"), bool), f"{path}: no clean_tree flag"
    else:
        provenance = record.get("provenance") or {}
        assert provenance.get("historical") is True, f"{path}: neither commit nor historical"
        assert SHA.match(provenance.get("committed_in", "")), f"{path}: no committed_in"

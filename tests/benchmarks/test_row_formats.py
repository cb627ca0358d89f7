"""The row-format benchmark at toy size: every format written as a real cache and read back;
its bytes and errors are checked against what they rest on. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks.mlm.row_formats import FORMATS, main


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("row_formats")
    main(["--out", str(out), "--ks", "4", "16", "--examples", "6", "--tokens", "24"])
    assert "| top-k, int8 values | 16 |" in (out / "row_formats.md").read_text()
    return json.loads((out / "row_formats.json").read_text())


def by_format(result: dict, k: int) -> dict:
    return {f["format"]: f for f in result["formats"] if f["k"] == k}


def test_every_format_is_measured_and_its_bytes_are_the_formulas(result):
    assert result["device"] and "commit" in result and result["positions"] > 0
    assert len(result["formats"]) == 1 + 2 * len(FORMATS)
    for k in (4, 16):
        rows = by_format(result, k)
        bytes_of = {name: f["row_bytes"] for name, f in rows.items()}
        assert bytes_of["top-k, int32 indices (old layout)"] == 6 * k + 12
        assert bytes_of["top-k"] == 4 * k + 12 and bytes_of["top-k + tail"] == 4 * k + 16
        assert bytes_of["top-k, int8 values"] == 3 * k + 16 == bytes_of["sampled, int8 values"]
        for f in rows.values():  # on disk: the rows, plus each example's 12 bytes and headers
            assert f["row_bytes"] < f["bytes_per_position"] < f["row_bytes"] + 400


def test_storage_adds_little_and_the_old_layout_reads_the_same_rows(result):
    rows = by_format(result, 16)
    old, new = rows["top-k, int32 indices (old layout)"], rows["top-k"]
    assert old["uniform"] == new["uniform"]  # the width changes no value
    for f in rows.values():
        for student in ("uniform", "near"):
            assert f[student]["storage_adds"]["grad_error"] < 1e-2
    assert rows["top-k + tail"]["uniform"]["grad_error"] < new["uniform"]["grad_error"]

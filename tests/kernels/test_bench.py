"""The kernel benchmark's harness, on a tiny sweep (on CPU: the kernel in the interpreter)."""

import json

import pytest
from kdscale.kernels import bench

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


def test_bench_writes_results_and_plot(tmp_path, capsys):
    report = bench.main(["--vocab", "3,1271", "--rows", "5", "--dtype", "fp32",
                         "--teacher", "dense,topk4", "--provider", "kdscale,eager",
                         "--out", str(tmp_path), "--plot"])
    saved = json.loads((tmp_path / "kd_loss_bench.json").read_text())
    assert saved["device"] == report["device"] and saved["byte_model"] == bench.BYTE_MODEL
    assert (tmp_path / "kd_loss_bench.png").stat().st_size > 0
    rows = saved["results"]
    assert len(rows) == 2 * 2 * 2  # V x teacher x provider
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    kdscale = [r for r in rows if r["provider"] == "kdscale"]
    assert all(r["rel_diff_vs_eager"] < 1e-5 for r in kdscale)
    dense_v3 = next(r for r in kdscale if r["teacher"] == "dense" and r["vocab"] == 3)
    assert dense_v3["model_bytes"] == 2 * 5 * 3 * 4 + 5 * 3 * 4 + 5 * 8  # s + grad, t, labels
    assert "byte model" in capsys.readouterr().out

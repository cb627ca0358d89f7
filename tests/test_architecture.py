"""The layer order of pyproject.toml's import-linter contracts holds, and would catch a new
import that crosses a layer the wrong way; no module imports another's private name."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(sys.executable).parent


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """import-linter over the `kdscale` package found in `project`, with its contracts."""
    return subprocess.run([str(TOOLS / "lint-imports"), "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache"], cwd=project, env={"PYTHONPATH": str(project)},
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "kdscale", tmp_path / "kdscale",
                    ignore=shutil.ignore_patterns("__pycache__"))
    low = tmp_path / "kdscale" / "cache" / "format.py"
    low.write_text(low.read_text() + "\nimport kdscale.train.loop  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "kdscale.cache is not allowed to import kdscale.train" in result.stdout


def test_no_module_imports_a_private_name_of_another():
    result = subprocess.run([str(TOOLS / "ruff"), "check", "--preview", "--select", "PLC2701",
                             "--output-format", "concise", "kdscale", "benchmarks", "tools"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]

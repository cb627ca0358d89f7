#!/usr/bin/env bash
# Regenerates constraints.txt, the tested set of versions the Quickstart installs: a fresh
# virtual environment takes the newest releases that pyproject.toml's ranges allow (with the
# torch release below), and every installed distribution is pinned at the version it got.
# Run the test suite on the result before committing it.
# Usage (from anywhere): tools/lock_constraints.sh [torch-version]
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${1:-2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==$torch_version" -e ".[dev]"
{
  echo "# The tested set the Quickstart installs (pip install -c constraints.txt ...): every"
  echo "# distribution of a fresh '.[dev]' environment, written by tools/lock_constraints.sh."
  echo "# The CPU build of torch keeps a fresh setup small and quick; on a GPU cluster install"
  echo "# the torch build that matches your CUDA first and leave this file out."
  # A local label (+cpu, +cu128) names one build; the version alone admits any of them.
  "$work/venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"

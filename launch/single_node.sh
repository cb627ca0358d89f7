#!/usr/bin/env bash
# kdscale on one machine, one process per GPU: one or more stages of an experiment in order.
#
#   launch/single_node.sh STAGE[,STAGE...] --config FILE [--section.key value ...]
#   launch/single_node.sh cache,distill,eval --config configs/sst2_bert_large.yaml
#
# Prints the launch plan (`kdscale env`) first, then runs each stage (finetune, cache,
# distill, eval) under `accelerate launch`; a failed stage stops the rest. `eval` runs as one
# process (it times the models' latency, which other processes would disturb).
#
# Options (environment variables):
#   ACCELERATE_CONFIG  default configs/accelerate/gpu_node.yaml
#                      (configs/accelerate/cpu_zero2.yaml tries it on a CPU-only machine)
#   NUM_PROCESSES      default: the GPUs nvidia-smi lists, else the config's own count
#   PYTHON             the Python with kdscale installed, default python
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STAGE[,STAGE...] --config FILE [--section.key value ...]" >&2
    exit 2
fi
stages=$1
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/gpu_node.yaml}
if [[ -z ${NUM_PROCESSES:-} ]] && command -v nvidia-smi > /dev/null; then
    NUM_PROCESSES=$(nvidia-smi --list-gpus | wc -l)
fi
count=()
if [[ -n ${NUM_PROCESSES:-} ]]; then
    count=(--num_processes "$NUM_PROCESSES")
fi

"$PYTHON" -m kdscale env "$@" --accelerate_config "$ACCELERATE_CONFIG" "${count[@]}"
IFS=, read -r -a stage_list <<< "$stages"
for stage in "${stage_list[@]}"; do
    echo "kdscale: stage $stage"
    if [[ $stage == eval ]]; then
        "$PYTHON" -m kdscale eval "$@"
    else
        "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
            "${count[@]}" -m kdscale "$stage" "$@"
    fi
done

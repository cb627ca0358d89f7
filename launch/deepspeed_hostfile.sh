#!/usr/bin/env bash
# kdscale under DeepSpeed's own launcher, with a hostfile (for clusters without SLURM, or
# where DeepSpeed's launcher is the house standard):
#
#   launch/deepspeed_hostfile.sh HOSTFILE COMMAND --config FILE [--section.key value ...]
#
# HOSTFILE has a line per node, `node-a slots=8`; the first node hosts the rendezvous.
# Two ways to start it:
#   - from the first node, with passwordless ssh to every node (DeepSpeed uses pdsh):
#       launch/deepspeed_hostfile.sh hostfile distill --config configs/X.yaml
#   - on every node by hand or by a scheduler, without ssh: set NODE_RANK (0 on the first
#     node) and the same MASTER_ADDR everywhere:
#       NODE_RANK=1 MASTER_ADDR=node-a launch/deepspeed_hostfile.sh hostfile distill --config ...
#
# Each process still runs kdscale's Accelerate code: the variables `accelerate launch` would
# set are set here and written to a DeepSpeed environment file, which DeepSpeed's launcher
# forwards to the other nodes (it forwards only a few variables by itself).
#
# Options (environment variables):
#   DEEPSPEED_CONFIG   the student's DeepSpeed JSON, default configs/deepspeed/zero2.json
#   MIXED_PRECISION    no | bf16 | fp16, default bf16
#   MASTER_ADDR        default: the first host of HOSTFILE
#   MASTER_PORT        default 29500
#   NODE_RANK          set: start this node only, without ssh (see above)
#   DEEPSPEED          the launcher command, default deepspeed
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 HOSTFILE COMMAND --config FILE [--section.key value ...]" >&2
    exit 2
fi
hostfile=$1
shift
if [[ ! -f $hostfile ]]; then
    echo "$0: hostfile $hostfile does not exist (expected lines like 'node-a slots=8')" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
MASTER_ADDR=${MASTER_ADDR:-$first_host}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED_CONFIG=$(realpath "${DEEPSPEED_CONFIG:-configs/deepspeed/zero2.json}")

export ACCELERATE_USE_DEEPSPEED=true
export ACCELERATE_DEEPSPEED_CONFIG_FILE=$DEEPSPEED_CONFIG
export ACCELERATE_MIXED_PRECISION=${MIXED_PRECISION:-bf16}
env_file=$(mktemp "${TMPDIR:-/tmp}/kdscale-deepspeed-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
printf '%s\n' "ACCELERATE_USE_DEEPSPEED=$ACCELERATE_USE_DEEPSPEED" \
    "ACCELERATE_DEEPSPEED_CONFIG_FILE=$ACCELERATE_DEEPSPEED_CONFIG_FILE" \
    "ACCELERATE_MIXED_PRECISION=$ACCELERATE_MIXED_PRECISION" > "$env_file"
export DS_ENV_FILE=$env_file

options=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         --no_local_rank --module)
if [[ -n ${NODE_RANK:-} ]]; then
    options+=(--no_ssh --node_rank "$NODE_RANK")
fi
echo "kdscale: DeepSpeed launcher, hosts from $hostfile, rendezvous at $MASTER_ADDR:$MASTER_PORT" \
     "${NODE_RANK:+(this node: rank $NODE_RANK)}"
"${DEEPSPEED:-deepspeed}" "${options[@]}" kdscale "$@"

#!/usr/bin/env bash
# One node's part of a SLURM job: srun starts it once per node (see launch/slurm.sbatch), and
# it runs `accelerate launch` for this node's processes:
#
#   launch/slurm_node.sh COMMAND --config FILE [--section.key value ...]
#
# Reads, per node: SLURM_NNODES, SLURM_NODEID (this node's rank: expanded here, inside the
# step, never in the batch script, where every node would read the first node's 0),
# SLURM_JOB_ID; and from slurm.sbatch: KDSCALE_MAIN_ADDR (the first node), ACCELERATE_CONFIG,
# PROCS_PER_NODE, optionally KDSCALE_MAIN_PORT, PYTHON, TRITON_CACHE_DIR.
set -euo pipefail

: "${SLURM_NNODES:?run under srun; see launch/slurm.sbatch}"
: "${SLURM_NODEID:?run under srun; see launch/slurm.sbatch}"
: "${KDSCALE_MAIN_ADDR:?set by launch/slurm.sbatch: the first node of the job}"
PYTHON=${PYTHON:-python}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MAIN_PORT=${KDSCALE_MAIN_PORT:-29500}

# Triton compiles kernels into its cache on first use; on a shared home directory nodes
# race on the same files (and NFS locking is slow), so each node keeps its own.
node_tmp=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$node_tmp/kdscale-triton-${SLURM_JOB_ID:-0}-$SLURM_NODEID}
mkdir -p "$TRITON_CACHE_DIR"

# The first node hosts the rendezvous store, said outright: torch's guess (does the address
# name this machine?) misses when nodes reach the head by another interface's address.
is_host=$((SLURM_NODEID == 0 ? 1 : 0))

echo "kdscale: node $SLURM_NODEID of $SLURM_NNODES ($(hostname)): $PROCS_PER_NODE process(es)," \
     "rendezvous at $KDSCALE_MAIN_ADDR:$MAIN_PORT"
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes "$((SLURM_NNODES * PROCS_PER_NODE))" \
    --main_process_ip "$KDSCALE_MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    --rdzv_backend c10d --rdzv_conf "is_host=$is_host" --max_restarts 0 \
    --deepspeed_multinode_launcher standard \
    -m kdscale "$@"

#!/usr/bin/env bash
# Train one config on every GPU of this workstation, with JAX's SPMD (one process).
#
#   launch/workstation.sh                                  # configs/moe_top2.py:gpu
#   launch/workstation.sh configs/dense.py:gpu --config.train.steps=2000
#   EXPERT=4 launch/workstation.sh                         # 4-way expert parallelism
#
# What to edit: CONFIG (a configs/*.py file and preset), EXPERT (how many GPUs split the
# experts; it must divide the GPU count and model.num_experts; the rest is data
# parallelism), WORKDIR (default runs/<config>-<preset>_<N>gpus; rerunning with the same
# WORKDIR resumes). Extra arguments go to
# chimera.main unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/moe_top2.py:gpu}
if [[ $# -gt 0 && $1 != --* ]]; then CONFIG=$1; shift; fi
# The GPUs this process may use: CUDA_VISIBLE_DEVICES's list where it is set, as JAX sees it.
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
  IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
  GPUS=${#visible[@]}
elif command -v nvidia-smi > /dev/null; then
  GPUS=$(nvidia-smi --list-gpus | wc -l)
else
  GPUS=0  # no driver tools: no NVIDIA GPU here
fi
if (( GPUS == 0 )); then echo "no GPU visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-}')" >&2; exit 2; fi
EXPERT=${EXPERT:-1}
if (( GPUS % EXPERT )); then echo "EXPERT=$EXPERT does not divide $GPUS GPUs" >&2; exit 2; fi
# The file's name and its preset: configs/moe_top2.py:gpu -> moe_top2-gpu.
name=$(basename "${CONFIG%%:*}" .py)${CONFIG##*.py}
WORKDIR=${WORKDIR:-runs/${name/:/-}_${GPUS}gpus}  # moe_top2-gpu_4gpus

# Overlap collectives with compute, and let XLA take most of each GPU's memory up front.
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

exec python -m chimera.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.mesh.data=$(( GPUS / EXPERT )) --config.mesh.expert="$EXPERT" "$@"

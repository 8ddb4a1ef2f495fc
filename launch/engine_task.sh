#!/bin/bash
# One generation task, started by generate.sbatch through srun: gives this task's vLLM engine its GPUs and
# its shard of the prompts, then becomes the generator (exec, so that signals reach it directly).
#   engine_task.sh COMMAND...   with SPIN_GPUS_PER_NODE, SPIN_ENGINE_GPUS and Slurm's task variables set
set -euo pipefail
if [ "${SPIN_GPUS_PER_NODE:-0}" -gt 0 ]; then
  # Engine k of a node takes GPUs k*E .. k*E+E-1 of those the node granted the job.
  IFS=, read -r -a granted <<<"${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((SPIN_GPUS_PER_NODE - 1)))}"
  first=$((SLURM_LOCALID * SPIN_ENGINE_GPUS))
  mine=("${granted[@]:$first:$SPIN_ENGINE_GPUS}")
  CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${mine[*]}")
  export CUDA_VISIBLE_DEVICES
fi
exec "$@" --shard-index "$SLURM_PROCID" --num-shards "$SLURM_NTASKS"

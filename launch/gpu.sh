#!/usr/bin/env bash
# One NVIDIA GPU: install the CUDA build of JAX (the `cuda` extra), set the XLA/JAX options that
# help a single-GPU run, and run an lm command (default: finetune).
#
#   launch/gpu.sh [--skip-install] [--dry-run] [LM_COMMAND [ARGS...]]
#   e.g. launch/gpu.sh finetune --config configs/finetune/sentiment.yaml model.remat=full
#
#   --skip-install   do not pip-install the project with the cuda extra (already done)
#   --dry-run        print the commands and environment instead of running them
# Environment it sets (an existing value wins):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90   let XLA preallocate 90% of GPU memory (JAX's default
#                                         is 75%), leaving room for cuDNN/cuBLAS workspaces
#   XLA_FLAGS+=--xla_gpu_enable_latency_hiding_scheduler=true
#                                         overlap copies and collectives with compute
#   CUDA_VISIBLE_DEVICES=0                one GPU (set it to pick another)
# Use model.dtype=bfloat16 and model.attention=cudnn (flash attention) in the config on GPUs.
set -euo pipefail

install=1 dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --skip-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done
[[ $# -eq 0 ]] && set -- finetune

run() {
  echo "+ $*"
  ((dry_run)) || "$@"
}

cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
case " ${XLA_FLAGS:-} " in
  *xla_gpu_enable_latency_hiding_scheduler*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true" ;;
esac
echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES XLA_FLAGS=$XLA_FLAGS"

python=${PYTHON:-python3}
((install)) && run "$python" -m pip install -q -e '.[cuda]'
run "$python" -m lm "$@"

#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, install this project on every
# worker, run `lm pretrain` on all workers at once (jax.distributed finds its peers by itself on
# TPU VMs), stream the output (only process 0 prints progress), and optionally delete it.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --run-dir gs://BUCKET/RUN [options] [-- LM_ARGS...]
#
# Options:
#   --name NAME             TPU VM name (required)
#   --zone ZONE             e.g. us-west4-a (required)
#   --run-dir URI           train.run_dir; a gs:// path, so that a re-created VM resumes (required)
#   --project ID            Google Cloud project (default: gcloud's configured one)
#   --accelerator-type T    e.g. v5litepod-256, v5p-512 (default v5litepod-8)
#   --version V             TPU software version (default v2-alpha-tpuv5-lite)
#   --config FILE           lm config passed to `lm pretrain` (default configs/shakespeare.yaml)
#   --command CMD           lm command to run (default pretrain; finetune works the same way)
#   --spot                  create a Spot VM (cheaper, can be preempted)
#   --retries N             after a preemption, re-create the VM and re-run up to N times
#                           (default 3); the run resumes from the newest checkpoint in --run-dir
#                           (on SIGTERM, lm checkpoints the step it reached and exits 0)
#   --delete                delete the VM when the run ends (success or not)
#   --dry-run               print the gcloud commands instead of running them
#   -- LM_ARGS...           more `lm` arguments, e.g. model.remat=full mesh.fsdp=-1
set -euo pipefail

name="" zone="" run_dir="" project="" accelerator="v5litepod-8" version="v2-alpha-tpuv5-lite"
config="configs/shakespeare.yaml" command="pretrain" spot=0 retries=3 delete=0 dry_run=0
lm_args=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --accelerator-type) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --command) command=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --retries) retries=$2; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; lm_args=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for required in name zone run_dir; do
  if [[ -z ${!required} ]]; then
    echo "tpu_vm.sh: --${required//_/-} is required (see --help)" >&2
    exit 2
  fi
done

where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

# Print (dry run) or run one command, echoing it either way, quoted for a shell to paste.
run() {
  local arg line="+"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then line+=" $arg"; else line+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "$line"
  ((dry_run)) || "$@"
}

vm_state() {
  ((dry_run)) && { echo ABSENT; return; }
  gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null \
    || echo ABSENT
}

create_and_install() {
  local create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
    --accelerator-type="$accelerator" --version="$version")
  ((spot)) && create+=(--spot)
  if [[ $(vm_state) == ABSENT ]]; then run "${create[@]}"; fi
  # The project's tracked files (no venv, no runs) go to every worker and install with the TPU extra.
  run git archive --format=tar.gz -o /tmp/lm-src.tar.gz HEAD
  run gcloud compute tpus tpu-vm scp /tmp/lm-src.tar.gz "$name":lm-src.tar.gz "${where[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command \
    "mkdir -p ~/lm && tar xzf ~/lm-src.tar.gz -C ~/lm && python3 -m pip install -q -e \"\$HOME/lm[tpu]\""
}

log=$(mktemp)
train() {
  local quoted=""
  ((${#lm_args[@]})) && quoted=$(printf ' %q' "${lm_args[@]}")
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command \
    "cd ~/lm && python3 -m lm $command --config $config train.run_dir=$run_dir${quoted}" \
    2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

finish() {
  rm -f "$log"
  ((delete)) && run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  return 0
}
trap finish EXIT

for ((attempt = 0; ; attempt++)); do
  create_and_install
  code=0
  train || code=$?
  # A preempted run checkpoints its step and exits 0 too: only its last line tells them apart.
  preempted=0
  grep -q "stopped by SIGTERM" "$log" && preempted=1
  ((code == 0 && !preempted)) && exit 0
  state=$(vm_state)
  [[ $state == PREEMPTED || $state == TERMINATED ]] && preempted=1
  if ((!preempted || attempt >= retries)); then
    echo "tpu_vm.sh: the run failed (VM state $state); see the output above" >&2
    exit 1
  fi
  echo "tpu_vm.sh: VM $state; re-creating it and resuming from $run_dir" >&2
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
done

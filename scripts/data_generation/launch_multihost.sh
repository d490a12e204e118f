#!/usr/bin/env bash
# Start the same kdgen job on every host of a fleet, one process per host, with per-host logs.
#
#   launch_multihost.sh tpu  TPU_NAME ZONE [PROJECT]   # every worker of a TPU VM (gcloud ... --worker=all)
#   launch_multihost.sh hosts host1,host2,...          # plain ssh to a list of hosts
#
# The job's settings are the env vars of run_sequence_kd.sh (MODEL_PATH, DATASET_PATH,
# GCS_BUCKET_PATH, ...): every variable named in `kdgen flags` that is set here is forwarded.
# HOST_INDEX / NUM_HOSTS are set per host (TPU: worker i of NUM_WORKERS, default from `describe`).
# Run mode, by KDGEN_IMAGE: set -> `docker run` that image on each host (GPU: --gpus all;
# TPU: --privileged --net host); unset -> run scripts/data_generation/run_sequence_kd.sh from
# KDGEN_DIR (default: this checkout's path) on each host.
# Logs: LOG_DIR (default ./logs/<timestamp>)/host-<i>.log here; the remote runs are foreground
# ssh sessions, so Ctrl-C stops them all. Exit status: non-zero if any host failed.
# DRY_RUN=1 prints each host's command instead of running it.
set -euo pipefail

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1; shift

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KDGEN_DIR="${KDGEN_DIR:-$here}"
LOG_DIR="${LOG_DIR:-./logs/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$LOG_DIR"

# Forward every kdgen knob that is set, plus the bash job's own names.
knobs="GCS_BUCKET_PATH GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT VLLM_CPU_KVCACHE_SPACE HF_TOKEN KDGEN_LOG_LEVEL"
knobs="$knobs $(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from kdgen.config import JobConfig; import dataclasses; print(" ".join(f.name.upper() for f in dataclasses.fields(JobConfig)))' "$here" 2>/dev/null || true)"
[ -n "${MODEL_PATH:-}" ] || { echo "launch_multihost.sh: MODEL_PATH is not set (see run_sequence_kd.sh)" >&2; exit 2; }

env_args() {  # KEY=VALUE words for the remote command, shell-quoted
  local out="" v
  for v in $knobs; do
    [ -n "${!v:-}" ] && out="$out $v=$(printf '%q' "${!v}")"
  done
  printf '%s' "$out"
}

remote_command() {  # $1: extra env words
  if [ -n "${KDGEN_IMAGE:-}" ]; then
    local envflags="" kv
    for kv in $(env_args) $1; do envflags="$envflags -e $kv"; done
    local dev="--gpus all"
    [ "$mode" = tpu ] && dev="--privileged --net host"
    echo "sudo docker run --rm $dev $envflags ${KDGEN_IMAGE}"
  else
    echo "cd $(printf '%q' "$KDGEN_DIR") && env $(env_args) $1 bash scripts/data_generation/run_sequence_kd.sh"
  fi
}

launch() {  # $1: log file, rest: the command that reaches one host
  local log=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; return; fi
  "$@" >"$log" 2>&1 &
  pids+=($!)
}

pids=()
case "$mode" in
  tpu)
    name=$1; zone=${2:?zone}; project=${3:-}
    gc=(gcloud compute tpus tpu-vm)
    workers=${NUM_WORKERS:-$("${gc[@]}" describe "$name" --zone "$zone" ${project:+--project "$project"} \
      --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .)}
    for ((i = 0; i < workers; i++)); do
      cmd=$(remote_command "HOST_INDEX=$i NUM_HOSTS=$workers")
      echo "launching worker $i/$workers of TPU $name ($zone); log: $LOG_DIR/host-$i.log"
      launch "$LOG_DIR/host-$i.log" "${gc[@]}" ssh "$name" --zone "$zone" ${project:+--project "$project"} \
        --worker="$i" --command "$cmd"
    done
    ;;
  hosts)
    IFS=, read -r -a hosts <<<"$1"
    n=${#hosts[@]}
    for i in "${!hosts[@]}"; do
      echo "launching host $i/$n on ${hosts[$i]}; log: $LOG_DIR/host-$i.log"
      launch "$LOG_DIR/host-$i.log" ssh -o BatchMode=yes "${hosts[$i]}" "$(remote_command "HOST_INDEX=$i NUM_HOSTS=$n")"
    done
    ;;
  *) usage ;;
esac

failed=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  wait "$pid" || failed=$((failed + 1))
done
[ -n "${DRY_RUN:-}" ] && exit 0
echo "launch_multihost.sh: $((${#pids[@]} - failed))/${#pids[@]} launches exited 0; logs in $LOG_DIR"
[ "$failed" -eq 0 ]

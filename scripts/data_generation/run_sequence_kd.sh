#!/usr/bin/env bash
# Sequence-KD data generation on one host: the same command on every host of a TPU/GPU fleet.
#
# Driven by environment variables (the names of `kdgen flags`, upper-cased). Required:
#   MODEL_PATH      HF model directory of the teacher (local or gs://)
#   DATASET_PATH    parquet directory / glob / comma-separated files (local or gs://)
#   GCS_BUCKET_PATH output directory (gs://bucket/dir or local); OUTPUT_PATH is the same knob
# Common: TOKENIZER_PATH TENSOR_PARALLEL_SIZE PIPELINE_PARALLEL_SIZE GEN_BATCH_SIZE
#   MAX_PREFILL_LENGTH MAX_TARGET_LENGTH TEMPERATURE TOP_P TOP_K NUM_SAMPLES LOGPROBS LOGPROBS_MODE
#   OUTPUT_FILE_FORMAT (jsonl | parquet) CHUNK_SIZE
#   SEED HOST_INDEX NUM_HOSTS (default: TPU_WORKER_ID / TPU_WORKER_HOSTNAMES, else 0 / 1).
# Every other kdgen knob (see `kdgen flags`) is read from its env var too.
# Exit codes: 0 done, 2 bad settings or input (one line says which), 1 the job stopped
# (finished chunks are kept; run the same command again to resume).
set -euo pipefail

export OUTPUT_PATH="${OUTPUT_PATH:-${GCS_BUCKET_PATH:-}}"
missing=()
for var in MODEL_PATH DATASET_PATH OUTPUT_PATH; do
  [ -n "${!var:-}" ] || missing+=("$var")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "run_sequence_kd.sh: missing required environment variable(s): ${missing[*]}" \
       "(OUTPUT_PATH may be given as GCS_BUCKET_PATH)" >&2
  exit 2
fi

# No defaults here: every knob's default is kdgen.config's (the same as MaxText's sequence-KD
# generator for MAX_PREFILL_LENGTH 1024, MAX_TARGET_LENGTH 4096, TEMPERATURE 0.8, CHUNK_SIZE 1000),
# so this script and `kdgen run` cannot drift apart. `kdgen flags` prints them.
# gcsfs probes gRPC for hierarchical namespaces on every call unless told not to.
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="${GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT:-false}"

PYTHON="${KDGEN_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

echo "run_sequence_kd.sh on $(hostname) at $(date -u +%FT%TZ)"
for var in MODEL_PATH TOKENIZER_PATH DATASET_PATH OUTPUT_PATH TENSOR_PARALLEL_SIZE PIPELINE_PARALLEL_SIZE \
           GEN_BATCH_SIZE MAX_PREFILL_LENGTH MAX_TARGET_LENGTH TEMPERATURE TOP_P TOP_K NUM_SAMPLES LOGPROBS \
           LOGPROBS_MODE OUTPUT_FILE_FORMAT CHUNK_SIZE SEED HOST_INDEX NUM_HOSTS TPU_WORKER_ID; do
  # user:password@ in a URL is a secret: shown as ***@ (sed reads the value on stdin, not argv)
  printf '  %-24s %s\n' "$var" "$(printf '%s' "${!var:-(default)}" | sed -E 's#([A-Za-z][A-Za-z0-9+.-]*://)[^/?#[:space:]]+@#\1***@#g')"
done

exec "$PYTHON" -m kdgen.cli run "$@"

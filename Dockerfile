# One recipe, two targets: the same kdgen job on GPU hosts (vllm) and TPU VM hosts (vllm-tpu).
#   docker build --target gpu -t kdgen:gpu .     docker run --gpus all -e MODEL_PATH=... kdgen:gpu
#   docker build --target tpu -t kdgen:tpu .     docker run --privileged --net host -e ... kdgen:tpu
# The entry point is the env-driven bash job (scripts/data_generation/run_sequence_kd.sh);
# arguments after the image name are passed to `kdgen run` as flags.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false \
    KDGEN_PYTHON=python \
    KDGEN_CACHE=/tmp/kdgen-cache
WORKDIR /opt/kdgen

COPY pyproject.toml README.md ./
COPY kdgen kdgen
COPY converters converters
COPY scripts scripts
ENTRYPOINT ["bash", "scripts/data_generation/run_sequence_kd.sh"]

FROM base AS gpu
RUN pip install ".[gpu,gcs]" && python -c "import vllm, gcsfs, kdgen.cli"

FROM base AS tpu
RUN pip install ".[tpu,gcs]" && python -c "import vllm, gcsfs, kdgen.cli"

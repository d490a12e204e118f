"""What kdgen reads from the environment besides its knobs (kdgen.config reads those).

The host's place in a fleet (TPU VM and launcher variables), and variables that look like a
misspelt knob. Depends on nothing else in kdgen, so that kdgen.config can use it.
"""

from __future__ import annotations

import difflib


# Environment variables of other tools, never mistaken for a misspelt knob.
FOREIGN_ENV_PREFIXES = ("VLLM_", "JAX_", "XLA_", "TPU_", "GCS", "GOOGLE_", "CLOUDSDK_", "KDGEN_", "CUDA_", "NCCL_",
                        "TORCH", "HF_", "HUGGING", "TRANSFORMERS_", "TOKENIZERS_", "PYTHON", "OMP_", "MKL_", "LC_",
                        "SSH_", "XDG_", "CONDA", "VIRTUAL_", "PYTEST", "GIT_", "AWS_", "OPENAI_", "RAY_", "NVIDIA_",
                        "LD_", "OLD", "BASH", "STORAGE_", "TERM", "DEBIAN_", "DBUS_")


def near_misses(env, knobs: list[str]) -> list[tuple[str, str]]:
    """[(variable, knob variable it resembles)] for env vars that look like a misspelt knob:
    not a knob themselves, upper case, not another tool's, and close to one of `knobs`."""
    out = []
    for var in sorted(env):
        if var in knobs or len(var) < 4 or var != var.upper() or var.startswith(FOREIGN_ENV_PREFIXES):
            continue
        close = difflib.get_close_matches(var, knobs, n=1, cutoff=0.85)
        if close:
            out.append((var, close[0]))
    return out


def detect_host(env) -> tuple[int, int]:
    """(host index, host count) from a TPU VM or common launchers; (0, 1) on a lone host."""
    for key in ("TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "JOB_COMPLETION_INDEX", "RANK", "NODE_RANK"):
        if env.get(key, "").isdigit():
            index = int(env[key])
            break
    else:
        index = 0
    count = 1
    if env.get("TPU_WORKER_HOSTNAMES"):
        count = len([h for h in env["TPU_WORKER_HOSTNAMES"].split(",") if h])
    elif env.get("WORLD_SIZE", "").isdigit():
        count = int(env["WORLD_SIZE"])
    return index, max(count, index + 1)

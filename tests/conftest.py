"""Session fixtures: one tiny model, one real vLLM CPU engine, one fake-gcs-server."""

from __future__ import annotations

import os
import sys

import pytest

# Before anything imports vLLM or gcsfs.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

# Engine settings that work on the 2-core CPU machines (see shared/FACTS.md).
CPU_ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from kdgen import tiny

    return tiny.make_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The one in-process vLLM engine of the test session (start-up is the slow part)."""
    from kdgen import config as config_mod
    from kdgen.engine import VllmEngine

    c = config_mod.JobConfig(model_path=tiny_model, temperature=0.0, **CPU_ENGINE)
    eng = VllmEngine(c)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def job_config(**kw):
    """A JobConfig for tests: greedy, small budgets, no env vars read."""
    from kdgen import config as config_mod

    base = dict(temperature=0.0, max_prefill_length=32, max_target_length=48, chunk_size=20,
                gen_batch_size=64, log_every_s=1000.0, lease_ttl_s=30.0, **CPU_ENGINE)
    base.update(kw)
    return config_mod.from_sources(base, env={})


@pytest.fixture(scope="session")
def gcs_server():
    """A real fake-gcs-server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from tests.gcs_server import start_server

    server = start_server()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    yield server
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old
    server.stop()

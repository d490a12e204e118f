"""The engine a job's settings ask for: the fake engine (FAKE_ENGINE, tests and benchmarks), an
OpenAI-compatible endpoint (ENDPOINT), or in-process vLLM. Engines are imported on demand: vLLM
only where it runs."""

from __future__ import annotations

from kdgen.config import JobConfig
from kdgen.engines.base import Engine


def make_engine(c: JobConfig) -> Engine:
    if c.fake_engine:
        from kdgen.engines.fake import FakeEngine

        return FakeEngine(c)
    if c.endpoint:
        from kdgen.engines.endpoint import EndpointEngine

        return EndpointEngine(c)
    from kdgen.engines.vllm_engine import VllmEngine

    return VllmEngine(c)

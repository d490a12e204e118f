"""Tests for tests/test_suite_guards.py to run in a pytest session of their own (the name keeps
them out of the suite's collection): they start processes titled as vLLM's engine core, which the
engine-start counter (tests/engine_starts.py) takes for engine starts."""

from __future__ import annotations

import os
import subprocess

import pytest


def engine_cores(n: int) -> None:
    """n processes at once titled as vLLM names its engine core, alive long enough to be seen."""
    procs = [subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore_DP0 sleep 1"]) for _ in range(n)]
    for p in procs:
        p.wait()


def test_unmarked_start():
    engine_cores(1)


@pytest.mark.engine
def test_marked_starts():
    engine_cores(int(os.environ.get("KDGEN_GUARD_STARTS", "1")))

"""Tests for tests/test_suite_guards.py to run in a pytest session of their own (the name keeps
them out of the suite's collection): they start processes titled as vLLM's engine core, which the
engine-start counter (tests/engine_starts.py) takes for engine starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.engine_starts import TITLE

CORE = TITLE + "_DP0"  # as vLLM titles its engine core process


def engine_cores(n: int, seconds: float = 2) -> None:
    """n processes at once titled as vLLM names its engine core, alive `seconds` (2 s: long
    enough to count)."""
    procs = [subprocess.Popen(["bash", "-c", f"exec -a {CORE} sleep {seconds}"]) for _ in range(n)]
    for p in procs:
        p.wait()


def test_unmarked_start():
    engine_cores(1)


@pytest.mark.engine
def test_marked_starts():
    engine_cores(int(os.environ.get("KDGEN_GUARD_STARTS", "1")))


@pytest.mark.engine
def test_a_start_whose_engine_core_forks():
    """As vLLM's engine core running `lscpu` through a shell: the forked child shows the engine
    core's title until it execs (here it never does), and is no engine start."""
    code = "import os, time; pid = os.fork(); time.sleep(2); pid and os.waitpid(pid, 0)"
    subprocess.run(["bash", "-c", f"exec -a {CORE} {sys.executable} -c '{code}'"], check=True)


@pytest.mark.engine
def test_titles_that_pass():
    """Processes that show the title for a moment only, as a child forked by an engine core
    whose parent is gone before the poll: no engine start."""
    for _ in range(5):
        engine_cores(2, 0.05)

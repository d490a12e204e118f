"""The suite's own guards fail a session: more engine starts than the budget, or an engine
started by a test without the engine/serve marker (so that `-m "not engine"` would run it); and
the counter takes no passing fork of an engine core for a start. Each case is a pytest session of
its own over tests/guard_cases.py, with the suite's conftest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ENGINE_START_BUDGET, REPO


@pytest.fixture
def session(request):
    """Runs a pytest session over tests/guard_cases.py; its engine starts are not this session's."""
    foreign = request.config.engine_starts.foreign

    def run(*args: str, starts: int = 1) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not one of our workers
        env.update(PYTHONPATH=REPO, KDGEN_GUARD_STARTS=str(starts))
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        foreign.add(proc.pid)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
            proc.wait()
            foreign.discard(proc.pid)  # pids are reused (32,768 of them here)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    return run


def test_within_the_budget_the_session_passes_and_counts(session):
    r = session("tests/guard_cases.py::test_marked_starts", starts=2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"engine starts: 2 (budget {ENGINE_START_BUDGET})" in r.stdout


def test_over_the_budget_the_session_fails(session):
    r = session("tests/guard_cases.py::test_marked_starts", starts=ENGINE_START_BUDGET + 1)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "1 passed" in r.stdout  # the test itself passed: the session is what fails
    assert (f"FAILED: {ENGINE_START_BUDGET + 1} engine starts exceed the budget of {ENGINE_START_BUDGET}"
            in r.stdout), r.stdout[-3000:]


def test_a_child_forked_by_an_engine_core_is_not_a_start(session):
    r = session("tests/guard_cases.py::test_a_start_whose_engine_core_forks")
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"engine starts: 1 (budget {ENGINE_START_BUDGET})" in r.stdout, r.stdout[-3000:]


def test_a_title_shown_for_a_moment_is_not_a_start(session):
    r = session("tests/guard_cases.py::test_titles_that_pass")
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"engine starts: 0 (budget {ENGINE_START_BUDGET})" in r.stdout, r.stdout[-3000:]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "n2"])
def test_an_unmarked_engine_start_fails_the_session(session, workers):
    r = session("tests/guard_cases.py::test_unmarked_start", "tests/guard_cases.py::test_marked_starts", *workers)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "2 passed" in r.stdout
    assert ("FAILED: tests/guard_cases.py::test_unmarked_start started a vLLM engine but is not marked engine or "
            "serve") in r.stdout, r.stdout[-3000:]
    assert "test_marked_starts started" not in r.stdout

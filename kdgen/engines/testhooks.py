"""Test-only faults of the in-process engine. Off unless a test sets one of these env vars:

    KDGEN_TEST_KILL_ON=ID,ID,...    SIGKILL the EngineCore when a request whose prompt contains
                                    this token id sequence is added (a row that kills the engine)
    KDGEN_TEST_STALL_ON=ID,ID,...   SIGSTOP it instead (a step() that never returns: a hung engine)

Both act on the real engine process, so the job sees exactly what a real death or hang looks like.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

HOOKS = {"KDGEN_TEST_KILL_ON": signal.SIGKILL, "KDGEN_TEST_STALL_ON": signal.SIGSTOP}


def from_env() -> list[tuple[list[int], int]]:
    """[(marker token ids, signal)] of the hooks that are set; [] in every real run."""
    hooks = []
    for var, sig in HOOKS.items():
        value = os.environ.get(var, "").strip()
        if value:
            hooks.append(([int(x) for x in value.split(",")], sig))
    return hooks


def contains(ids: list[int], marker: list[int]) -> bool:
    n = len(marker)
    return any(ids[i:i + n] == marker for i in range(len(ids) - n + 1))


def engine_pids(llm) -> list[int]:
    manager = llm.llm_engine.engine_core.resources.engine_manager
    return [p.pid for p in manager.processes]


def fire(hooks, llm, prompts: list[list[int]]) -> None:
    for marker, sig in hooks:
        if any(contains(ids, marker) for ids in prompts):
            for pid in engine_pids(llm):
                log.warning("test hook: a prompt holds the marker %s: sending %s to EngineCore pid %d",
                            marker, signal.Signals(sig).name, pid)
                os.kill(pid, sig)

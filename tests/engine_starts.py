"""Counts the vLLM engine starts of a test session (in-process engines, `kdgen run` subprocesses,
`vllm serve`), each charged to the test that was running, for the engine budget.

An engine core run inside its caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the converter's
one-shot check) starts no such process and is not counted (it starts in seconds).
vLLM names every engine-core process `VLLM::EngineCore...` (setproctitle): a thread polls this
process's descendants for new ones. An engine start takes ~20 s here, so a 0.2 s poll sees all.
"""

from __future__ import annotations

import collections
import threading

import psutil

TITLE = "VLLM::EngineCore"


class EngineStarts(threading.Thread):
    def __init__(self, poll_s: float = 0.2):
        super().__init__(name="engine-starts", daemon=True)
        self.poll_s = poll_s
        self.current = "(between tests)"
        self.owners: dict[int, str] = {}  # pid -> the name its engines are charged to, whatever test runs
        self.foreign: set[int] = set()  # pids whose engines are not this session's (a pytest run by a test)
        self.per_test: collections.Counter[str] = collections.Counter()
        self.unmarked: set[str] = set()  # tests that started one without the engine or serve marker
        self._seen: set[tuple[int, float]] = set()
        self._stop = threading.Event()

    @property
    def total(self) -> int:
        return sum(self.per_test.values())

    def run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.poll_s):
            self.scan(me)

    def scan(self, me: psutil.Process) -> None:
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:
                key = (p.pid, p.create_time())
                if key in self._seen:
                    continue
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].startswith(TITLE):
                self._seen.add(key)
                if not self.is_foreign(p):
                    self.per_test[self.owner(p) or self.current] += 1

    def owner(self, p: psutil.Process) -> str | None:
        """The name charged for engines started under an owned process (a background server)."""
        try:
            return next((self.owners[a.pid] for a in p.parents() if a.pid in self.owners), None)
        except psutil.Error:
            return None

    def is_foreign(self, p: psutil.Process) -> bool:
        try:
            return any(a.pid in self.foreign for a in p.parents())
        except psutil.Error:
            return False

    def stop(self) -> None:
        self._stop.set()
        self.scan(psutil.Process())

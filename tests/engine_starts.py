"""Counts the vLLM engine starts of a test session (in-process engines, `kdgen run` subprocesses,
`vllm serve`), each charged to the test that was running, for the engine budget.

An engine core run inside its caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the converter's
one-shot check) starts no such process and is not counted (it starts in seconds).
vLLM names every engine-core process `VLLM::EngineCore...` (setproctitle): a thread polls this
process's descendants for new ones. An engine start takes ~20 s here, so a 0.2 s poll sees all;
a process counts once it kept the title 0.5 s and was not forked by an engine core.
"""

from __future__ import annotations

import collections
import threading
import time

import psutil

TITLE = "VLLM::EngineCore"
# A process counts once it has kept the title this long: a child forked by an engine core shows
# the title until it execs (the worker's spawn, `lscpu`), which on a busy machine a poll can see.
CONFIRM_S = 0.5


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
        self._titled: dict[tuple[int, float], tuple[float, str]] = {}  # seen with the title (when, test running)
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
            if not (cmd and cmd[0].startswith(TITLE)) or self.forked_from_engine(p):
                continue
            first, test = self._titled.setdefault(key, (time.monotonic(), self.current))
            if time.monotonic() - first >= CONFIRM_S:  # an engine core, not a passing fork of one
                self._seen.add(key)
                del self._titled[key]
                charged = self.charged_to(p, test)
                if charged is not None:
                    self.per_test[charged] += 1

    def charged_to(self, p: psutil.Process, test: str) -> str | None:
        """Who an engine start is charged to: the name of an owned ancestor (a background server),
        else `test`; None under a foreign ancestor (another session's)."""
        try:
            ancestors = [a.pid for a in p.parents()]
        except psutil.Error:
            ancestors = []
        if any(pid in self.foreign for pid in ancestors):
            return None
        return next((self.owners[pid] for pid in ancestors if pid in self.owners), test)

    @staticmethod
    def forked_from_engine(p: psutil.Process) -> bool:
        """A child of an engine core shows its title until it execs (the engine core runs `lscpu`
        through a shell at start): on a busy machine a poll can land in between."""
        try:
            parent = p.parent()
            cmd = parent.cmdline() if parent is not None else []
            return bool(cmd) and cmd[0].startswith(TITLE)
        except psutil.Error:
            return False

    def stop(self) -> None:
        self._stop.set()
        self.scan(psutil.Process())

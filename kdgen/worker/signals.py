"""Signals and the stall watchdog of the worker: SIGTERM during the engine start, SIGTERM while
the job runs (a grace period for in-flight requests, then Preempted), and the progress watchdog
that ends a process whose engine hangs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from kdgen.engines.pool import RequestPool

log = logging.getLogger(__name__)


class Preempted(Exception):
    """SIGTERM: the grace period for in-flight requests is over (or nothing was left in flight)."""


@contextlib.contextmanager
def sigterm_takes_the_children():
    """During the engine start nothing is leased or saved yet, so SIGTERM ends the process as it
    always did (killed by the signal), but first SIGKILLs the engine processes being started:
    left alone they outlive us as orphans holding the accelerator's memory, and the next start on
    this host fails for lack of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        log.warning("SIGTERM during the engine start: stopping its processes and exiting")
        kill_children()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def kill_children() -> None:
    """SIGKILL this process's children (the engine's processes), however wedged."""
    try:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception as e:  # exiting matters more
        log.warning("could not stop the engine's processes: %s", e)


class Watchdog(threading.Thread):
    """Calls on_stall(seconds) once if no request finished for timeout_s while some were in flight."""

    def __init__(self, pool: RequestPool, timeout_s: float, on_stall):
        super().__init__(name="kdgen-watchdog", daemon=True)
        self.pool, self.timeout_s, self.on_stall = pool, timeout_s, on_stall
        self._stop = threading.Event()

    def run(self) -> None:
        if self.timeout_s <= 0:
            return
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            stalled = self.pool.stalled_s()
            if stalled >= self.timeout_s:
                self.on_stall(stalled)
                return

    def stop(self) -> None:
        self._stop.set()


class Signals:
    """SIGTERM sets `stop` and remembers when (the grace period counts from it)."""

    def __init__(self, stop: threading.Event):
        self.at: float | None = None
        self.name = ""
        self.old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM,):
            def handler(signum, frame):
                if self.at is None:
                    self.at, self.name = time.monotonic(), signal.Signals(signum).name
                    log.warning("%s: stopping intake; finishing what is in flight for up to PREEMPT_GRACE_S", self.name)
                stop.set()
            self.old[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)

"""The handoff between the feeder's thread and the worker loop: a bounded queue of leased chunks
(then None once the walk is over, with what stopped it in `error`), and the two signals between
them: the loop is hungry (it has room and no rows: the feeder may lease one more) and the engine
ran dry (a waiting feeder may start a backup copy now).
"""

from __future__ import annotations

import collections
import queue
import threading
import time


class Handoff:
    def __init__(self, maxsize: int = 0):
        self.maxsize = maxsize  # 0: unbounded
        self.error: BaseException | None = None  # what stopped the walk, if anything did
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._hungry = threading.Event()
        self._dry = threading.Event()

    # ---- the queue ------------------------------------------------------------------------------
    def _full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def put(self, item) -> None:
        """Queue a chunk's work (None: the walk is over); blocks while the queue is full."""
        with self._cond:
            while self._full():
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def close(self, error: BaseException | None) -> None:
        """The walk is over (error: what stopped it)."""
        self.error = error
        self.put(None)

    def get(self, timeout: float | None = None):
        """The next item; raises queue.Empty if none came within `timeout` (None: wait)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def get_nowait(self):
        return self.get(timeout=0)

    def empty(self) -> bool:
        with self._cond:
            return not self._items

    def drain(self) -> None:
        """Stopping: drop what is queued (unblocks a feeder waiting for room)."""
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    # ---- the signals ----------------------------------------------------------------------------
    def feed_me(self) -> None:
        """From the worker loop: the engine has room and no rows to fill it with."""
        self._hungry.set()
        with self._cond:
            self._cond.notify_all()

    def fed(self) -> None:
        """The feeder queued a chunk: the loop is not hungry any more until it says so again."""
        self._hungry.clear()

    def wait_for_room(self, depth: int, until_hungry: bool, stop: threading.Event) -> bool:
        """Block until fewer than `depth` chunks are queued and, if `until_hungry`, until the loop
        asks for rows; False if the job is stopping."""
        with self._cond:
            while len(self._items) >= depth or (until_hungry and not self._hungry.is_set()):
                if stop.is_set():
                    return False
                self._cond.wait(0.5)
        return not stop.is_set()

    def engine_ran_dry(self) -> None:
        self._dry.set()

    def nap(self, seconds: float, stop: threading.Event) -> None:
        """Wait up to `seconds`; sooner when the job stops or the engine runs dry."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._dry.wait(min(left, 1.0)):
                self._dry.clear()
                return

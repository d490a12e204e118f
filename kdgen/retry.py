"""One retry policy for kdgen: storage requests, endpoint requests and engine restarts.

A `Policy` is how many tries, how long to wait between them (exponential backoff with jitter, so
that hosts retrying at once spread out) and the most seconds all tries may take. `Policy.call`
runs a function until it returns, raises an error that is not transient, or the tries or the
deadline are spent; loops that wait in their own way (an engine restart waits on a stop event)
take the waits from `Policy.delay_s`. What kdgen retries and why: docs/operations.md ("Storage and credentials").
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_LEFT_S = 0.05  # less than this left before the deadline: no further try


def reason(e: BaseException) -> str:
    """`Type: message` of an error on one line (at most 300 characters), for logs and messages."""
    msg = " ".join(str(e).split())
    name = type(e).__name__
    return f"{name}: {msg}"[:300] if msg else name


class OutOfTime(Exception):
    """Policy.call ran out of its deadline; raised from the last error (its __cause__)."""


@dataclass(frozen=True)
class Policy:
    """attempts: tries in all (1: no retry). The wait before retry i (0-based) is
    min(max_delay_s, base_delay_s * 2**i) times a factor drawn from [1 - jitter, 1 + jitter],
    and never more than half the time left before the deadline."""

    attempts: int
    base_delay_s: float
    max_delay_s: float
    jitter: float = 0.5
    deadline_s: float | None = None

    def delay_s(self, retry: int, left_s: float | None = None) -> float:
        d = min(self.max_delay_s, self.base_delay_s * 2 ** retry)
        if left_s is not None:
            d = min(d, left_s / 2)
        return d * random.uniform(1 - self.jitter, 1 + self.jitter)

    def call(self, fn: Callable[[], T], what: str, transient: Callable[[BaseException], bool],
             deadline: float | None = None) -> T:
        """fn(), tried again after errors for which transient(error) is true. The last error is
        raised when the tries are spent; OutOfTime (from the last error) when the deadline is
        (deadline: a time.monotonic() value, default now + deadline_s). Logs each retry."""
        if deadline is None and self.deadline_s is not None:
            deadline = time.monotonic() + self.deadline_s
        for i in range(self.attempts):
            try:
                return fn()
            except Exception as e:
                if not transient(e):
                    raise
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= MIN_LEFT_S:
                    raise OutOfTime(f"{what}: out of time; last error {reason(e)}") from e
                if i == self.attempts - 1:
                    raise
                wait = self.delay_s(i, left)
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, reason(e), i + 1, self.attempts - 1, wait)
                time.sleep(wait)
        raise ValueError(f"{what}: a retry policy needs at least one attempt, not {self.attempts}")

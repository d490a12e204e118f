"""Storage retries: kdgen.retry's policy with the storage settings and one deadline per operation.

Every storage operation may take at most settings.deadline_s seconds, retries included (gcsfs
retries inside each of our attempts too: a read of an object that answers 503 would otherwise
block for minutes); nested calls share the outer deadline, and reads bound their own wait by
remaining_s(). See docs/operations.md ("Storage and credentials").
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from kdgen.retry import OutOfTime, Policy, reason
from kdgen.storage.base import StorageError, errors

T = TypeVar("T")


@dataclass
class Settings:
    """Process-wide; from the environment at import, the deadline from --storage_deadline_s."""
    attempts: int = int(os.environ.get("KDGEN_STORAGE_RETRIES", "4"))
    base_delay_s: float = float(os.environ.get("KDGEN_STORAGE_RETRY_DELAY_S", "1.0"))
    max_delay_s: float = 30.0
    deadline_s: float = float(os.environ.get("STORAGE_DEADLINE_S") or 300.0)


settings = Settings()


def configure(deadline_s: float | None = None) -> None:
    """Process-wide storage settings (from the job's config)."""
    if deadline_s is not None:
        if deadline_s <= 0:
            raise ValueError(f"storage deadline must be positive, got {deadline_s}")
        settings.deadline_s = float(deadline_s)


def _http_code(e: BaseException) -> int | None:
    code = getattr(e, "code", None) or getattr(e, "status", None)
    try:
        return int(code) if code is not None else None
    except (TypeError, ValueError):
        return None


def is_transient(e: BaseException) -> bool:
    """True for errors worth retrying: 5xx, 408, 429, timeouts, dropped connections."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, ValueError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    code = _http_code(e)
    if code is not None:
        return code >= 500 or code in (408, 429)
    mod = type(e).__module__ or ""
    return mod.startswith(("aiohttp", "requests", "urllib3")) or type(e).__name__ in ("ChecksumError",)


_attempt = threading.local()  # .deadline: time.monotonic() by which the current operation must end


def remaining_s() -> float | None:
    """Seconds left for the storage call in progress on this thread (None outside retry())."""
    d = getattr(_attempt, "deadline", None)
    return None if d is None else max(d - time.monotonic(), 0.001)


def retry(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None,
          max_delay: float | None = None, retriable: Callable[[BaseException], bool] = is_transient,
          deadline_s: float | None = None) -> T:
    """Call fn(); on a transient error sleep base_delay * 2**i (x jitter 0.5-1.5) and try again,
    at most `attempts` times and never past `deadline_s` seconds (default settings.deadline_s) in
    all: then StorageError. Reads inside fn bound their own wait by remaining_s()."""
    policy = Policy(attempts=settings.attempts if attempts is None else attempts,
                    base_delay_s=settings.base_delay_s if base_delay is None else base_delay,
                    max_delay_s=settings.max_delay_s if max_delay is None else max_delay)
    budget = settings.deadline_s if deadline_s is None else deadline_s
    outer = getattr(_attempt, "deadline", None)
    deadline = time.monotonic() + budget
    _attempt.deadline = deadline if outer is None else min(deadline, outer)
    try:
        return policy.call(fn, what, retriable, deadline=deadline)
    except OutOfTime as e:
        raise StorageError(f"{what}: no success within the storage deadline of {budget:g} s "
                           f"(STORAGE_DEADLINE_S); last error {reason(e.__cause__)}") from e.__cause__
    finally:
        _attempt.deadline = outer


def idempotent(op: str, url: str, fn: Callable[[], T]) -> T:
    """fn() with retries; errors as one-line StorageError naming op and url."""
    with errors(op, url):
        return retry(fn, f"{op} {url}")

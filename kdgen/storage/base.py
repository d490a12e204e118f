"""What every storage backend shares: the Stat of an object, the errors, and the Store contract."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

from kdgen.retry import reason


@dataclass(frozen=True)
class Stat:
    generation: str  # changes on every write of the object
    size: int
    mtime: float | None


class StorageError(OSError):
    """A storage operation failed after retries; the message names the operation and the URL."""


class InputChanged(ValueError):
    """A corpus file is not the version the job planned (rewritten, replaced, deleted)."""


class LocationError(ValueError):
    """A path knob names an unsupported URL scheme or a bucket that does not exist (a settings error)."""


@contextlib.contextmanager
def errors(op: str, url: str):
    """FileNotFoundError stays; anything else becomes one-line StorageError(f"{op} {url}: {reason}")."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:
        raise StorageError(f"{op} {url}: {reason(e)}") from e


class Store(Protocol):
    """One backend (a URL scheme). The functions of kdgen.storage call these; tests and
    bench/fleet_sim.py inject their own with kdgen.storage.register / using."""

    def exists(self, url: str) -> bool: ...
    def stat(self, url: str) -> Stat | None: ...
    def read_bytes(self, url: str) -> bytes: ...
    def write_bytes(self, url: str, data: bytes) -> None: ...
    def create(self, url: str, data: bytes) -> Stat | None: ...
    def replace(self, url: str, data: bytes, generation: str) -> Stat | None: ...
    def delete(self, url: str, if_generation: str | None = None, check_first: bool = True) -> None: ...
    def list_stats(self, dir_url: str, stats: bool = True) -> dict[str, Stat | None]: ...
    def expand(self, path: str) -> list[tuple[str, Stat]]: ...
    def open_input(self, url: str, size: int = -1, version: str = ""): ...
    def filesystem(self, url: str) -> tuple[object, str]: ...

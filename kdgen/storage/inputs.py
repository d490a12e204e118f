"""Corpus files opened for reading, pinned to the version the job planned.

Local: the size and mtime are checked on the open file, before and after reading. gs://: ranged
reads of that generation, INPUT_BLOCK bytes at a time (a newer generation answers 404). Either
raises InputChanged when the file is not the planned version. See docs/integrity.md.
"""

from __future__ import annotations

import io
import os
from typing import Callable

from kdgen.retry import reason
from kdgen.storage.base import InputChanged, StorageError
from kdgen.storage.urls import local_path

INPUT_BLOCK = 4 << 20  # bytes fetched per ranged read of a gs:// input file (read-ahead)


class LocalInput(io.FileIO):
    def __init__(self, url: str, size: int, version: str):
        super().__init__(local_path(url), "rb")
        self.url, self.want = url, (size, version)
        self.failure: BaseException | None = None  # a read error of the file system (not of the data)
        self.check()

    def readinto(self, b):
        try:
            return super().readinto(b)
        except OSError as e:
            self.failure = StorageError(f"read {self.url}: {reason(e)}")
            raise self.failure from e

    def check(self) -> None:
        size, version = self.want
        if not version:
            return
        st = os.fstat(self.fileno())
        if st.st_size != size or str(st.st_mtime_ns) != version:
            raise InputChanged(f"{self.url} changed while the job ran (size {size} -> {st.st_size}, "
                               f"mtime_ns {version} -> {st.st_mtime_ns})")

    def close(self) -> None:
        try:
            if not self.closed:
                self.check()
        finally:
            super().close()


class RangedInput(io.RawIOBase):
    """Ranged reads of one generation of an object: read_range(url, start, end, generation)."""

    def __init__(self, url: str, size: int, generation: str,
                 read_range: Callable[[str, int, int, str], bytes]):
        super().__init__()
        self.url, self.size, self.generation, self.read_range = url, size, generation, read_range
        self.pos = 0
        self.buf_start, self.buf = 0, b""
        self.failure: BaseException | None = None  # a storage error under a reader (e.g. pyarrow)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        lo = self.pos - self.buf_start
        if not (0 <= lo and lo + n <= len(self.buf)):
            end = min(self.size, self.pos + max(n, INPUT_BLOCK))
            try:
                self.buf_start, self.buf = self.pos, self.read_range(self.url, self.pos, end, self.generation)
            except BaseException as e:
                self.failure = e
                raise
            lo = 0
            if len(self.buf) < n:
                raise InputChanged(f"{self.url}: generation {self.generation} has fewer bytes than planned")
        b[:n] = self.buf[lo:lo + n]
        self.pos += n
        return n

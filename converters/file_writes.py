"""Writing finished buffers into the shard files: in order on a background thread, optionally O_DIRECT.

`BackgroundWrites` pwrite()s each submitted buffer at its file offset (errors are re-raised in the
caller's thread); with an O_DIRECT descriptor the aligned middle of a buffer goes straight to the
disk and only its unaligned ends through the page cache. `aligned_empty` makes buffers that can
take that path without a copy.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import threading

import numpy as np

from converters import ConvertError

# O_DIRECT: file offset, length and memory address in multiples of DIRECT_ALIGN (the page size
# covers every logical block size in use); pieces shorter than DIRECT_MIN go through the page cache.
DIRECT_ALIGN = 4096
DIRECT_MIN = 64 << 10
BOUNCE_BYTES = 8 << 20


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _pwrite_direct(dfd: int, fd: int, data: np.ndarray, offset: int) -> None:
    """Aligned data (uint8) at an aligned offset through the O_DIRECT descriptor; a short write that
    leaves an unaligned rest (not expected on local filesystems) finishes through the page cache."""
    done = 0
    while done < data.size:
        n = os.pwrite(dfd, memoryview(data[done:]), offset + done)
        done += n
        if n == 0 or done % DIRECT_ALIGN:
            _pwrite_all(fd, memoryview(data[done:]), offset + done)
            return


def aligned_empty(shape, dtype, offset: int) -> np.ndarray:
    """np.empty(shape, dtype) whose address is congruent to `offset` modulo DIRECT_ALIGN (so a
    buffer bound for file offset `offset` can be written with O_DIRECT without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize if isinstance(shape, tuple) else int(shape) * dtype.itemsize
    raw = np.empty(nbytes + DIRECT_ALIGN, np.uint8)
    shift = (offset - raw.ctypes.data) % DIRECT_ALIGN
    return raw[shift: shift + nbytes].view(dtype).reshape(shape)


def open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor for path, or None where the filesystem (tmpfs, some FUSE) refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


class BackgroundWrites:
    """One background thread doing pwrite()s of finished buffers, in order; errors re-raised."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.pending_bytes = 0
        self.bounce: np.ndarray | None = None  # aligned staging for O_DIRECT writes of unaligned memory
        self.cv = threading.Condition()
        self.t = threading.Thread(target=self._run, name="kdgen-convert-writes", daemon=True)
        self.t.start()

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            fd, dfd, offset, buf, done = job
            try:
                if self.error is None:
                    self._write(fd, dfd, buf, offset)
                    if done:
                        done()  # e.g. upload a finished shard
            except BaseException as e:  # noqa: BLE001 - reported by check()
                self.error = e
            finally:
                with self.cv:
                    self.pending_bytes -= buf.nbytes
                    self.cv.notify_all()
                del buf

    def submit(self, fd: int, dfd: int | None, offset: int, buf: np.ndarray, done=None) -> None:
        self.check()
        with self.cv:
            self.pending_bytes += buf.nbytes
        self.q.put((fd, dfd, offset, buf, done))

    def _write(self, fd: int, dfd: int | None, buf: np.ndarray, offset: int) -> None:
        """Write buf at offset: through the page cache (fd), or, with an O_DIRECT descriptor dfd, its
        whole aligned blocks straight to the disk (the unaligned ends through fd: no block is
        written both ways). Memory not aligned like the file offset goes through a bounce buffer."""
        data = buf.reshape(-1).view(np.uint8)  # buffers are contiguous
        a0 = -offset % DIRECT_ALIGN
        a1 = (offset + data.size) // DIRECT_ALIGN * DIRECT_ALIGN - offset
        if dfd is None or a1 - a0 < DIRECT_MIN:
            _pwrite_all(fd, memoryview(data), offset)
            return
        _pwrite_all(fd, memoryview(data[:a0]), offset)
        _pwrite_all(fd, memoryview(data[a1:]), offset + a1)
        mid = data[a0:a1]
        if mid.ctypes.data % DIRECT_ALIGN == 0:
            _pwrite_direct(dfd, fd, mid, offset + a0)
            return
        if self.bounce is None:
            self.bounce = aligned_empty(BOUNCE_BYTES, np.uint8, 0)
        for i in range(0, mid.size, BOUNCE_BYTES):
            part = mid[i: i + BOUNCE_BYTES]
            b = self.bounce[: part.size]
            np.copyto(b, part)
            _pwrite_direct(dfd, fd, b, offset + a0 + i)

    def wait_below(self, nbytes: int) -> None:
        with self.cv:
            while self.pending_bytes > nbytes and self.error is None:
                self.cv.wait()
        self.check()

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise ConvertError(f"no space left while writing the model: {e}") from None
            raise e

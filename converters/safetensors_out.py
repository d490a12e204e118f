"""Sharded safetensors written in place, and their index (config and tokenizer: hf_dir).

Shard files are laid out up front (every shape is known before any data is read): header, then a
file of the final size. `ShardedSafetensors.write` puts each piece of a tensor in its place, cast
once to the output dtype and checked finite; every tensor's element count is tracked, so a missed
piece fails `finish` instead of reading as zeros. The buffers go out through file_writes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import threading
from typing import Callable

import numpy as np

from converters import ConvertError
from converters.dtypes import DTYPES, np_dtype
from converters.file_writes import BackgroundWrites, aligned_empty, open_direct

INDEX = "model.safetensors.index.json"


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = str(s).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


class NonFinite(ConvertError):
    """A piece of tensor `name` holds NaN or Inf (maybe only after the cast to the output dtype)."""

    def __init__(self, name: str, dtype: str):
        super().__init__(f"{name} would hold NaN or Inf in {dtype}")
        self.name, self.dtype = name, dtype


def nonfinite(a: np.ndarray) -> bool:
    """True if the float array holds NaN or Inf; bfloat16 (ml_dtypes) by its exponent bits."""
    if a.dtype.itemsize == 2 and a.dtype != np.float16:  # bfloat16: exponent all ones
        return bool(((a.view(np.uint16) & 0x7F80) == 0x7F80).any())
    return not bool(np.isfinite(a).all())


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T for 2-D src with contiguous rows (dst rows contiguous too, any row stride).

    numpy copies a transposed array one element at a time with a huge source stride (~3 ns per
    element here, a TLB miss each). Moving k = 8 / itemsize neighbours at once as one uint64 and
    then spreading the k lanes with a short local shuffle is 1.7-3x faster (bench/RESULTS.md)."""
    rows, cols = src.shape
    k = 8 // src.itemsize
    if k < 2 or cols % k or src.strides[1] != src.itemsize or src.strides[0] % 8 or dst.strides[1] != dst.itemsize:
        dst[...] = src.T
        return
    t64 = np.ascontiguousarray(src.view(np.uint64).T)  # [cols / k, rows]: k columns of src per element
    dst.reshape(cols // k, k, rows)[...] = t64.view(src.dtype).reshape(cols // k, rows, k).transpose(0, 2, 1)


def tune_malloc() -> None:
    """Keep freed block buffers in the heap (glibc): by default every 50 MB decode buffer is a fresh
    mmap whose pages fault in again, which cost ~40% of tensorstore's read CPU time here."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: do not give the top of the heap back
        libc.mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap in large steps
        libc.mallopt(-8, 1)  # M_ARENA_MAX: one heap for all threads (per-thread heaps each kept a block)
    except (OSError, AttributeError):
        pass  # not glibc: the defaults only cost time


class ShardedSafetensors:
    """Shards of a fixed tensor list; `write(name, index, float32 piece)` casts once and stores."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple[int, ...], int | None]], dtype: str,
                 max_shard_bytes: int, on_shard_done: Callable[[str], None] | None = None,
                 band_bytes: int = 32 << 20, buffer_bytes: int = 512 << 20, direct_io: bool = False):
        if dtype not in DTYPES:
            raise ConvertError(f"--dtype must be one of {'|'.join(DTYPES)} (got {dtype!r})")
        self.out_dir = out_dir
        self.st_dtype, cast, stored = DTYPES[dtype]
        self.cast_dtype, self.stored = np_dtype(cast), np.dtype(stored)
        self.itemsize = self.stored.itemsize
        self.on_shard_done = on_shard_done
        shards = _pack(_groups(tensors), self.itemsize, max_shard_bytes)
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[str, int, tuple[int, ...]]] = {}  # name -> (file, data offset, shape)
        self.left: dict[str, int] = {}  # elements not yet written
        self.file_left: dict[str, int] = {}  # tensors not complete per file
        self.fds: dict[str, int] = {}
        self.dfds: dict[str, int | None] = {}  # O_DIRECT descriptors (direct_io), None where refused
        self.total_size = 0
        for fname, shard in zip(self.files, shards):
            offsets, size = _create_shard(out_dir, fname, shard, self.st_dtype, self.itemsize)
            path = os.path.join(out_dir, fname)
            self.fds[fname] = os.open(path, os.O_RDWR)
            if direct_io:
                self.dfds[fname] = open_direct(path)
            for name, shape, _ in shard:
                self.where[name] = (fname, offsets[name], tuple(shape))
                self.left[name] = math.prod(shape)
            self.file_left[fname] = len(shard)
            self.total_size += size
        self.bytes_written = 0
        self.band_bytes = band_bytes
        self.buffer_bytes = buffer_bytes
        self.buffers: dict[str, np.ndarray] = {}  # tensors being assembled from column stripes
        self.buffered = 0
        self.lock = threading.Lock()
        self.writes = BackgroundWrites()

    # --- writing ----------------------------------------------------------------------------
    def _cast(self, a: np.ndarray, name: str) -> np.ndarray:
        """a cast to the output dtype (stored view); every written value passes here or through
        write's no-copy path, and none may be NaN/Inf (also after an overflowing cast)."""
        c = a.astype(self.cast_dtype, copy=False)
        if nonfinite(c):
            raise NonFinite(name, self.st_dtype)
        return c.view(self.stored)

    def _store_into(self, dst: np.ndarray, piece: np.ndarray, name: str) -> None:
        """dst[...] = cast(piece); a transposed piece is cast in its source's memory order first."""
        if piece.ndim == 2 and piece.strides[0] == piece.itemsize and piece.shape[0] > 1:
            transpose_into(dst, self._cast(piece.T, name))  # piece.T has contiguous rows
        else:
            dst[...] = self._cast(piece, name)

    # A piece goes to its place one of three ways:
    # * whole rows (a row block, or a whole tensor): cast once and written with one pwrite;
    # * a column stripe of a transposed tensor (a scanned block holds 1/s of E for every layer, so
    #   each output row gets s pieces) is assembled in an in-memory buffer of the whole tensor, which
    #   is written with one pwrite when its last stripe arrives: rows are written contiguously, never
    #   faulted page by page. Buffers are limited to `buffer_bytes` in all;
    # * a stripe that does not fit that budget goes straight to the file through a short-lived memory
    #   map of at most `band_bytes` of rows (the page cache holds the rest).
    # The pwrites run on a background thread (file_writes), so the next block is decoded and
    # transposed while the previous tensor is written. Transposed pieces are cast in their source
    # order and then transposed with `transpose_into` (numpy's own transposed copy is the slowest
    # step otherwise).
    def write(self, name: str, index: tuple[slice, ...], piece: np.ndarray) -> None:
        self.writes.check()
        fname, offset, shape = self.where[name]
        if piece.shape != tuple(sl.stop - sl.start for sl in index):
            raise AssertionError(f"{name}{index}: piece {piece.shape} does not fit")
        fd = self.fds[fname]
        whole_rows = len(shape) == 1 or (index[1].start == 0 and index[1].stop == shape[1])
        row_elems = 1 if len(shape) == 1 else shape[1]
        if whole_rows:  # contiguous in the file: one pwrite (in the background)
            self.writes.wait_below(max(0, self.buffer_bytes - self.buffered - piece.size * self.itemsize))
            if piece.dtype == self.cast_dtype and piece.flags.c_contiguous:
                if nonfinite(piece):
                    raise NonFinite(name, self.st_dtype)
                buf = piece.view(self.stored)  # already cast (by tensorstore) and in file order: no copy
            else:
                buf = aligned_empty(piece.shape, self.stored, offset + index[0].start * row_elems * self.itemsize)
                self._store_into(buf, piece, name)
            self._account(name, piece.size, fd, offset + index[0].start * row_elems * self.itemsize, buf)
            return
        buf = self.buffers.get(name)
        if buf is None and self._reserve(math.prod(shape) * self.itemsize):
            buf = self.buffers[name] = aligned_empty(shape, self.stored, offset)
        if buf is not None:
            self._store_into(buf[index], piece, name)
            self._account(name, piece.size, fd, offset, None)
            return
        # Over the buffer budget: a column stripe straight into the file, a band of rows at a time
        # (resident pages stay near band_bytes, however the piece is strided).
        path = os.path.join(self.out_dir, fname)
        (r0, r1), cols = (index[0].start, index[0].stop), index[1]
        row_bytes = shape[1] * self.itemsize
        step = max(1, self.band_bytes // row_bytes)
        for r in range(r0, r1, step):
            n = min(step, r1 - r)
            mm = np.memmap(path, dtype=self.stored, mode="r+", offset=offset + r * row_bytes, shape=(n, shape[1]))
            self._store_into(mm[:, cols], piece[r - r0: r - r0 + n], name)
            del mm  # unmap: the written pages leave this process (the page cache writes them back)
        self._account(name, piece.size, fd, offset, None)

    def _reserve(self, nbytes: int) -> bool:
        if nbytes > self.buffer_bytes:
            return False
        if self.buffered + self.writes.pending_bytes + nbytes > self.buffer_bytes:
            self.writes.wait_below(max(0, self.buffer_bytes - self.buffered - nbytes))
        if self.buffered + nbytes > self.buffer_bytes:
            return False
        self.buffered += nbytes
        return True

    def _account(self, name: str, n: int, fd: int, offset: int, buf: np.ndarray | None) -> None:
        self.left[name] -= n
        self.bytes_written += n * self.itemsize
        if self.left[name] < 0:
            raise AssertionError(f"{name} written twice")
        done = self.left[name] == 0
        if done and name in self.buffers:  # the assembled tensor goes out in one write
            buf = self.buffers.pop(name)
            self.buffered -= buf.nbytes
        if buf is not None:
            self.writes.submit(fd, self.dfds.get(self.where[name][0]), offset, buf,
                               (lambda: self._tensor_done(name)) if done else None)
        elif done:
            self._tensor_done(name)

    def _tensor_done(self, name: str) -> None:
        """Called once the tensor's last byte is in the file (maybe on the writer thread)."""
        fname = self.where[name][0]
        with self.lock:
            self.file_left[fname] -= 1
            complete = self.file_left[fname] == 0
        if complete and self.on_shard_done:
            self.on_shard_done(fname)

    # --- reading back (the probe) --------------------------------------------------------------
    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A written tensor (or rows of it) as float32. Waits for pending writes."""
        self.writes.wait_below(0)
        fname, offset, shape = self.where[name]
        mm = np.memmap(os.path.join(self.out_dir, fname), dtype=self.stored, mode="r", offset=offset, shape=shape)
        a = mm[rows] if rows is not None else mm
        if self.stored != self.cast_dtype:
            a = a.view(self.cast_dtype)
        out = np.asarray(a, dtype=np.float32)
        del mm
        return out

    def finish(self) -> dict:
        self.writes.close()
        self._close_files()
        missing = [n for n, left in self.left.items() if left]
        if missing:
            raise AssertionError(f"tensors not fully written: {missing[:5]}")
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {n: w[0] for n, w in self.where.items()}}
        with open(os.path.join(self.out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        return index

    def abort(self) -> None:
        try:
            self.writes.close()
        except BaseException:  # noqa: BLE001 - already failing
            pass
        self._close_files()

    def _close_files(self) -> None:
        for fd in list(self.fds.values()) + [d for d in self.dfds.values() if d is not None]:
            os.close(fd)
        self.fds, self.dfds = {}, {}


def _groups(tensors):
    """Keep one layer (and the head: final norm + lm_head) in one shard."""
    groups: list[list] = []
    key = object()
    for t in tensors:
        k = t[2] if t[2] is not None else ("head" if t[0] != "model.embed_tokens.weight" else "embed")
        if not groups or k != key:
            groups.append([])
            key = k
        groups[-1].append(t)
    return groups


def _pack(groups: list[list], itemsize: int, max_shard_bytes: int) -> list[list]:
    """Consecutive groups into shards of at most max_shard_bytes (a group alone may be larger)."""
    shards: list[list] = [[]]
    size = 0
    for g in groups:
        gbytes = sum(math.prod(s) for _, s, _ in g) * itemsize
        if shards[-1] and size + gbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(g)
        size += gbytes
    return shards


def _create_shard(out_dir: str, fname: str, shard: list, st_dtype: str, itemsize: int) -> tuple[dict[str, int], int]:
    """Write the header of out_dir/fname and give the file its final size: ({tensor: file offset of
    its data}, data bytes)."""
    header, off = {}, 0
    for name, shape, _ in shard:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(out_dir, fname), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        f.truncate(8 + len(hb) + off)
        try:  # reserve the blocks now: a full disk is an error here, not a SIGBUS mid-write
            os.posix_fallocate(f.fileno(), 0, 8 + len(hb) + off)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConvertError(f"no space left in {out_dir} for {fname} ({off / 1e9:.2f} GB); "
                                   "free space or pass --staging-dir / another --out") from None
            # EOPNOTSUPP/EINVAL: the filesystem cannot reserve; the sparse file still works
    return {name: 8 + len(hb) + header[name]["data_offsets"][0] for name, _, _ in shard}, off

"""Decode one stored zarr3 chunk a slab at a time, so a huge chunk is never whole in memory.

Orbax writes a zarr3 chunk as a `sharding_indexed` shard holding one inner chunk, encoded by the
`bytes` codec (C order, little endian) then `zstd` (orbax tensorstore_utils `_build_zarr3_metadata`).
Tensorstore decodes a chunk whole: a MaxText expert kernel saved on few devices has 1.125 GiB
chunks, and reading one took ~2x that (the decoded chunk plus the compressed bytes). Here the
compressed bytes are fetched in byte ranges of the kvstore (ocdbt, file or gcs) and each slab of
about `slab_bytes` is decoded into its own array: memory is a slab and one range of compressed
input, whatever the chunk size.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import math
from typing import Iterator

import numpy as np

from converters import ConvertError

COMPRESSED_RANGE_BYTES = 16 << 20  # compressed input fetched per kvstore read


# A zstd frame can be decoded as a stream, and a C-order chunk is a run of contiguous slabs along
# its first axis longer than 1. Only that exact encoding is streamed (`streamable` says why not
# otherwise); everything else is read by tensorstore as before. zstd comes from the system's
# libzstd through ctypes (the library tensorstore's own wheel links statically is not exported);
# without it nothing is streamed.


class _Buffer(ctypes.Structure):  # ZSTD_inBuffer / ZSTD_outBuffer: {src|dst, size, pos}
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


# The libzstd functions used here: name -> (argument types, result type).
_ZSTD_SIGNATURES = {
    "ZSTD_createDStream": ([], ctypes.c_void_p),
    "ZSTD_freeDStream": ([ctypes.c_void_p], ctypes.c_size_t),
    "ZSTD_initDStream": ([ctypes.c_void_p], ctypes.c_size_t),
    "ZSTD_decompressStream": ([ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)], ctypes.c_size_t),
    "ZSTD_isError": ([ctypes.c_size_t], ctypes.c_uint),
    "ZSTD_getErrorName": ([ctypes.c_size_t], ctypes.c_char_p),
}


def _libzstd():
    path = ctypes.util.find_library("zstd") or "libzstd.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for name, (args, res) in _ZSTD_SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, res
    return lib


_LIB = _libzstd()


def streamable(st, idx: tuple[slice, ...], whole_axes: tuple[int, ...]) -> str | None:
    """None when the box idx of store st is one whole stored chunk that can be decoded slab by slab;
    else the reason it cannot (it is then read by tensorstore)."""
    if _LIB is None:
        return "no libzstd"
    spec = st.spec().to_json()
    meta = spec.get("metadata", {})
    if spec.get("driver") != "zarr3":
        return "not zarr3"
    shape = tuple(meta["shape"])
    chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return "not a zarr3 shard (orbax writes every zarr3 chunk as one)"
    conf = codecs[0]["configuration"]
    if tuple(conf["chunk_shape"]) != chunk or conf.get("index_location", "end") != "end":
        return "a shard of several inner chunks"
    if [c["name"] for c in conf.get("index_codecs", [])] not in (["bytes", "crc32c"], ["bytes"]):
        return "unknown shard index codecs"
    codecs = conf["codecs"]
    if [c["name"] for c in codecs] != ["bytes", "zstd"]:
        return f"codecs {[c['name'] for c in codecs]}"
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return "big endian"
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
        return "chunk key encoding"
    if any(s.start % c or s.stop - s.start != c or s.stop > n for s, c, n in zip(idx, chunk, shape)):
        return "not one whole chunk inside the array"
    axis = split_axis(chunk)
    if axis in whole_axes:
        return "its slabs would cut an axis that must stay whole"
    return None


def split_axis(chunk: tuple[int, ...]) -> int:
    """The axis whose slabs are contiguous in C order: the first longer than 1."""
    return next((a for a, n in enumerate(chunk) if n > 1), len(chunk) - 1)


def slabs(st, idx: tuple[slice, ...], slab_bytes: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(offset within the chunk, array) for the chunk at idx of st (checked by `streamable`), in
    order, each a run of whole rows of the split axis of about slab_bytes (at least one row)."""
    chunk = tuple(s.stop - s.start for s in idx)
    dtype = st.dtype.numpy_dtype
    key = "c/" + "/".join(str(s.start // c) for s, c in zip(idx, chunk))
    kv = st.kvstore
    compressed = _frame_range(kv, key, st)
    axis = split_axis(chunk)
    row_bytes = math.prod(chunk[axis + 1:]) * dtype.itemsize
    rows = max(1, slab_bytes // row_bytes)
    stream = _ZstdStream(kv, key, *compressed)
    try:
        for r in range(0, chunk[axis], rows):
            n = min(rows, chunk[axis] - r)
            out = np.empty(chunk[:axis] + (n,) + chunk[axis + 1:], dtype)
            stream.fill(out)
            yield tuple(r if a == axis else 0 for a in range(len(chunk))), out
            del out
        stream.finish()
    finally:
        stream.close()


def ahead(items: Iterator) -> Iterator:
    """items, each next one produced on a thread while the caller works on the current one (zstd
    and the kvstore reads release the GIL): decoding overlaps the transposes and writes."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdgen-convert-slabs") as pool:
        end = object()
        fut = pool.submit(next, items, end)
        while (item := fut.result()) is not end:
            fut = pool.submit(next, items, end)
            yield item
            del item


def _frame_range(kv, key: str, st) -> tuple[int, int]:
    """(start, length) of the zstd frame in the value at key: the shard's one inner chunk, per
    its index (16 bytes: offset, length; then a 4-byte crc32c when the index codecs say so)."""
    codecs = st.spec().to_json()["metadata"]["codecs"]
    tail = 20 if [c["name"] for c in codecs[0]["configuration"]["index_codecs"]] == ["bytes", "crc32c"] else 16
    r = kv.read(key, byte_range=slice(-tail, None)).result()
    if r.state != "value" or len(r.value) != tail:
        raise ConvertError(f"chunk {key} of {kv.path}: no shard index ({r.state})")
    offset, length = (int(v) for v in np.frombuffer(r.value[:16], "<u8"))
    if offset == length == 2**64 - 1:
        raise ConvertError(f"chunk {key} of {kv.path} is empty (fill value)")
    return offset, length


class _ZstdStream:
    """A zstd frame read from kv[key] in byte ranges, decoded into caller-given arrays."""

    def __init__(self, kv, key: str, start: int, length: int):
        self.kv, self.key, self.pos, self.end = kv, key, start, start + length
        self.ds = _LIB.ZSTD_createDStream()
        self._check(_LIB.ZSTD_initDStream(self.ds))
        self.data = b""
        self.inp = _Buffer(None, 0, 0)
        self.done = False  # the frame ended

    def _check(self, rc: int) -> int:
        if _LIB.ZSTD_isError(rc):
            raise ConvertError(f"chunk {self.key} of {self.kv.path}: zstd: {_LIB.ZSTD_getErrorName(rc).decode()}")
        return rc

    def _more(self) -> None:
        stop = min(self.end, self.pos + COMPRESSED_RANGE_BYTES)
        self.data = self.kv.read(self.key, byte_range=slice(self.pos, stop)).result().value if stop > self.pos else b""
        if not self.data:
            raise ConvertError(f"chunk {self.key} of {self.kv.path}: the zstd frame is truncated at byte {self.pos}")
        self.pos += len(self.data)
        self.inp = _Buffer(ctypes.cast(ctypes.c_char_p(self.data), ctypes.c_void_p), len(self.data), 0)

    def fill(self, out: np.ndarray) -> None:
        view = out.reshape(-1).view(np.uint8)
        dst = _Buffer(view.ctypes.data, view.nbytes, 0)
        while dst.pos < dst.size:
            if self.done:
                raise ConvertError(f"chunk {self.key} of {self.kv.path}: the zstd frame holds fewer bytes than the chunk")
            if self.inp.pos == self.inp.size:
                self._more()
            self.done = self._check(_LIB.ZSTD_decompressStream(self.ds, ctypes.byref(dst), ctypes.byref(self.inp))) == 0

    def finish(self) -> None:
        """The frame must end exactly where the chunk does."""
        spare = np.empty(1, np.uint8)
        while not self.done:
            if self.inp.pos == self.inp.size:
                self._more()
            dst = _Buffer(spare.ctypes.data, 1, 0)
            self.done = self._check(_LIB.ZSTD_decompressStream(self.ds, ctypes.byref(dst), ctypes.byref(self.inp))) == 0
            if dst.pos:
                raise ConvertError(f"chunk {self.key} of {self.kv.path}: the zstd frame holds more bytes than the chunk")

    def close(self) -> None:
        if self.ds:
            _LIB.ZSTD_freeDStream(self.ds)
            self.ds = None

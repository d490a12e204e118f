"""Read the model params of a MaxText Orbax checkpoint block by block (tensorstore, no jax or orbax).

`Checkpoint` is an orbax_tree.ParamTree (which leaves there are and what they mean) plus their
arrays, opened with tensorstore (zarr3, or zarr v2 when `_METADATA` says `use_zarr3` is false or
does not say: orbax reads a missing field as False) over the ocdbt kvstore, and read in blocks
that follow the stored chunk grid (`block_shape`, `Checkpoint.iter_blocks`).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
from typing import Iterator, NamedTuple

import numpy as np

from converters import ConvertError, chunk_stream, storage
from converters.dtypes import np_dtype
from converters.orbax_tree import GLOBAL_LEAVES, LAYER_LEAVES, ParamTree, resolve_items

# The leaf tables live in orbax_tree; the tests and bench/bench_convert.py import them from here.
__all__ = ["GLOBAL_LEAVES", "LAYER_LEAVES", "Checkpoint", "block_shape"]


class _Block(NamedTuple):
    """One read: the box idx of a leaf, `store` cast to the output dtype where asked (`source` not)."""
    name: str
    layer: int | None
    origin: tuple[int, ...]
    store: object
    idx: tuple[slice, ...]
    small: bool  # within the block budget
    stored: int  # itemsize as stored
    source: object
    whole_axes: tuple[int, ...]
    cast: np.dtype | None
    slabs: bool  # a huge chunk may be decoded slab by slab along its first axis


class Checkpoint(ParamTree):
    """The params of one Orbax item dir. `opened` records every array key read (for tests)."""

    def __init__(self, path: str, block_bytes: int = 64 << 20, read_threads: int = 4, prefetch: int = 2):
        import tensorstore as ts

        self._ts = ts
        self.path = resolve_items(path)
        self.block_bytes = block_bytes
        self.prefetch = prefetch
        fs, p = storage.filesystem(self.path)
        meta = {}
        if fs.exists(p + "/_METADATA"):
            try:
                meta = json.loads(fs.cat_file(p + "/_METADATA"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ConvertError(f"{self.path}/_METADATA is not Orbax JSON metadata: {e}") from None
        self.use_ocdbt = bool(meta.get("use_ocdbt", fs.exists(p + "/manifest.ocdbt")))
        # Orbax's PyTreeCheckpointHandler reads a missing use_zarr3 as False (zarr v2): older checkpoints.
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        if "tree_metadata" in meta:
            keys = {tuple(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
                    if not (v.get("value_metadata") or {}).get("skip_deserialize")}
        else:
            keys = self._list_keys()
        super().__init__(self.path, keys)
        # Local files are read through memory maps (tensorstore's file_io_mode "memmap"): the
        # default copies every byte into fresh buffers, which cost more than half of the read time.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_mode": {"mode": "memmap"},
                                    "data_copy_concurrency": {"limit": read_threads},
                                    "file_io_concurrency": {"limit": read_threads}})
        self._stores: dict[tuple, object] = {}
        self.opened: list[str] = []
        self.bytes_read = 0
        self.streamed_chunks = 0  # huge chunks decoded slab by slab (chunk_stream)
        self.check_leaves()
        if self.scanned:
            self.num_layers = self.shape("query")[1]

    # --- keys --------------------------------------------------------------------------------
    def _list_keys(self) -> set[tuple[str, ...]]:
        """Array keys from an ocdbt listing (when _METADATA is missing)."""
        if not self.use_ocdbt:
            raise ConvertError(f"{self.path}/_METADATA is missing: not an Orbax checkpoint item dir")
        kv = self._ts.KvStore.open({"driver": "ocdbt", "base": self._base()}).result()
        names = set()
        for k in kv.list().result():
            k = k.decode()
            for marker, zarr3 in (("/zarr.json", True), ("/.zarray", False)):
                if k.endswith(marker):
                    names.add(k[: -len(marker)])
                    self.use_zarr3 = zarr3
        return {tuple(n.split(".")) for n in names}

    # --- arrays -----------------------------------------------------------------------------
    def _base(self):
        if storage.is_remote(self.path):
            bucket, _, prefix = self.path.split("://", 1)[1].partition("/")
            return {"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/"}
        return {"driver": "file", "path": os.path.abspath(storage.local_path(self.path)) + "/"}

    def store(self, name: str, layer: int | None = None):
        key = self.key(name, layer)
        if key not in self._stores:
            array_name = ".".join(key)
            if self.use_ocdbt:
                kvstore = {"driver": "ocdbt", "base": self._base(), "path": array_name + "/"}
            else:
                base = self._base()
                kvstore = {**base, "path": base["path"] + array_name + "/"}
            spec = {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kvstore}
            try:
                self._stores[key] = self._ts.open(spec, open=True, read=True, context=self._context).result()
            except Exception as e:  # tensorstore raises ValueError with a long message
                raise ConvertError(f"cannot open leaf {'/'.join(key)} in {self.path} as "
                                   f"{'zarr3' if self.use_zarr3 else 'zarr v2'}: {str(e).splitlines()[0]}") from None
            self.opened.append("/".join(key))
        return self._stores[key]

    def shape(self, name: str, layer: int | None = None) -> tuple[int, ...]:
        return tuple(self.store(name, layer).shape)

    def dtype(self, name: str, layer: int | None = None) -> np.dtype:
        return self.store(name, layer).dtype.numpy_dtype

    def read(self, name: str, layer: int | None = None) -> np.ndarray:
        """A whole leaf (small leaves and tests only)."""
        a = self.store(name, layer).read().result()
        self.bytes_read += a.nbytes
        return a

    def blocks(self, name: str, layer: int | None = None, whole_axes: tuple[int, ...] = ()
               ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """(origin, block) over the whole leaf: whole stored chunks, or slabs of a huge one."""
        for _, _, origin, a in self.iter_blocks([(name, layer, whole_axes)]):
            yield origin, a

    # Reads follow the stored chunk grid: a block is a whole number of stored chunks, never a slice
    # of one (which would decode the chunk again for every slice), except that a chunk larger than
    # the block budget may be decoded as a stream, slab by slab (chunk_stream).
    def _plan(self, name: str, layer: int | None, whole_axes: tuple[int, ...], cast: str | None = None,
              slabs: bool = False) -> Iterator[_Block]:
        st = self.store(name, layer)
        shape = tuple(st.shape)
        chunk = st.chunk_layout.read_chunk.shape or shape
        bshape = block_shape(shape, tuple(c or s for c, s in zip(chunk, shape)), whole_axes,
                             st.dtype.numpy_dtype.itemsize, self.block_bytes)
        small = math.prod(bshape) * st.dtype.numpy_dtype.itemsize <= self.block_bytes
        stored = st.dtype.numpy_dtype.itemsize
        source, to = st, None
        if cast and np.dtype(st.dtype.numpy_dtype) != np_dtype(cast):
            st, to = self._ts.cast(st, cast), np_dtype(cast)  # converted by tensorstore's threads, as the chunks decode
        for origin in itertools.product(*(range(0, s, b) for s, b in zip(shape, bshape))):
            idx = tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, bshape, shape))
            yield _Block(name, layer, origin, st, idx, small, stored, source, whole_axes, to, slabs)

    def iter_blocks(self, leaves: list[tuple]
                    ) -> Iterator[tuple[str, int | None, tuple[int, ...], np.ndarray]]:
        """(name, layer, origin, block) over several leaves in order, each leaf given as (name, layer,
        whole_axes[, dtype to cast to while reading[, slabs]]), with `prefetch` blocks being
        decoded (by tensorstore's threads) while the caller transforms the current one, across leaf
        boundaries too. A block larger than the budget (one stored chunk can be) is decoded slab by
        slab when the leaf allows it (`slabs`) and chunk_stream can (each slab is a block here),
        else read alone by tensorstore."""
        plan = itertools.chain.from_iterable(self._plan(*leaf) for leaf in leaves)
        nxt = [next(plan, None)]
        pending: collections.deque = collections.deque()  # (block, future or None: streamed, small)

        def fill() -> None:
            while nxt[0] is not None and len(pending) < 1 + self.prefetch:
                b = nxt[0]
                stream = b.slabs and not b.small and chunk_stream.streamable(b.source, b.idx, b.whole_axes) is None
                small = b.small or stream  # a streamed chunk holds a slab at a time
                if pending and (not small or not pending[-1][2]):
                    return  # a huge block is read alone: nothing before it, nothing after it
                pending.append((b, None if stream else b.store[b.idx].read(), small))
                nxt[0] = next(plan, None)

        fill()
        while pending:
            b, fut, small = pending.popleft()
            if fut is None:
                yield from self._streamed(b, fill)
                continue
            a = fut.result()
            self.bytes_read += a.size * b.stored  # bytes as stored (before a cast)
            if small:  # read ahead while the caller works on this block (not beside a huge one)
                fill()
            yield b.name, b.layer, b.origin, a
            del a
            fill()

    def _streamed(self, b: _Block, fill) -> Iterator[tuple[str, int | None, tuple[int, ...], np.ndarray]]:
        """One huge stored chunk, decoded slab by slab (the next blocks are read ahead meanwhile)."""
        self.streamed_chunks += 1
        for offset, a in chunk_stream.ahead(chunk_stream.slabs(b.source, b.idx, self.block_bytes)):
            self.bytes_read += a.nbytes
            if b.cast is not None:
                a = a.astype(b.cast)  # rounds as tensorstore's cast does (to nearest even)
            fill()
            yield b.name, b.layer, tuple(o + d for o, d in zip(b.origin, offset)), a
            del a
        fill()


def block_shape(shape: tuple[int, ...], chunk: tuple[int, ...], whole_axes: tuple[int, ...],
                itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """Stored chunks merged up to ~target_bytes; axes in whole_axes span the full extent.

    A block never cuts a stored chunk, so each chunk is decoded once. Blocks grow along the
    last axes first (contiguous rows for the transposed outputs).
    """
    block = [min(c, s) for c, s in zip(chunk, shape)]
    for a in whole_axes:
        block[a] = shape[a]
    for a in reversed(range(len(shape))):
        while block[a] < shape[a]:
            grown = min(shape[a], block[a] * 2)
            if math.prod(block) // block[a] * grown * itemsize > target_bytes:
                break
            block[a] = grown
        if block[a] < shape[a]:
            break  # keep blocks convex: do not grow an earlier axis past an unfinished one
    return tuple(block)

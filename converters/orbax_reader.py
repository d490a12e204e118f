"""Find the model params in a MaxText Orbax item dir and read them block by block.

An item dir is `.../checkpoints/<step>/items` (full train state: params, opt_state, step, maybe
more keys) or a params-only `<dir>/0/items`. Only the leaves under the model root
(`params/params/...`) are ever opened: never opt_state, never teacher_params. Unknown top-level
keys are ignored. The tree comes from `_METADATA` (JSON); the arrays are read with tensorstore
(zarr3 or zarr over the ocdbt kvstore), so no jax or orbax import is needed here.

Scanned layouts hold every layer in one array with the layer axis at 1; unscanned ones hold
`decoder/layers_{i}/...`. Reads follow the stored chunk grid: a block is a whole number of
stored chunks (never a slice of a chunk, which would decode the chunk again for every slice).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from typing import Iterator

import numpy as np

from converters import ConvertError, storage

# Per-layer leaves, relative to decoder/layers (scanned) or decoder/layers_{i} (unscanned).
LAYER_LEAVES: dict[str, tuple[str, ...]] = {
    "query": ("self_attention", "query", "kernel"),
    "key": ("self_attention", "key", "kernel"),
    "value": ("self_attention", "value", "kernel"),
    "out": ("self_attention", "out", "kernel"),
    "wi_0": ("mlp", "wi_0", "kernel"),
    "wi_1": ("mlp", "wi_1", "kernel"),
    "wo": ("mlp", "wo", "kernel"),
    "pre_norm": ("pre_self_attention_layer_norm", "scale"),
    "post_norm": ("post_self_attention_layer_norm", "scale"),
}
# Leaves outside the layers, relative to the model root.
GLOBAL_LEAVES: dict[str, tuple[str, ...]] = {
    "embedding": ("token_embedder", "embedding"),
    "final_norm": ("decoder", "decoder_norm", "scale"),
    "logits": ("decoder", "logits_dense", "kernel"),
}
# Where the model root may sit in the item tree, most specific first. Never under opt_state
# or teacher_params.
ROOTS = (("params", "params"), ("params",), ())
SKIPPED = ("opt_state", "teacher_params")
_LAYER_RE = re.compile(r"^layers_(\d+)$")


def resolve_items(path: str) -> str:
    """The item dir for PATH (PATH itself, or PATH/items); a one-line error otherwise."""
    path = path.rstrip("/")
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise ConvertError(f"--checkpoint {path}: no such file or directory")
    if _is_item_dir(fs, p):
        return path
    if _is_item_dir(fs, p + "/items"):
        return storage.join(path, "items")
    try:
        steps = sorted(int(os.path.basename(x.rstrip("/"))) for x in fs.ls(p, detail=False)
                       if os.path.basename(x.rstrip("/")).isdigit())
    except (NotADirectoryError, OSError):
        steps = []
    hint = f" (it holds steps {steps[-3:]}: pass {path}/{steps[-1]}/items)" if steps else ""
    raise ConvertError(f"--checkpoint {path} is not an Orbax checkpoint item dir: no _METADATA or "
                       f"manifest.ocdbt{hint}")


def _is_item_dir(fs, p: str) -> bool:
    return fs.exists(p + "/_METADATA") or fs.exists(p + "/manifest.ocdbt")


class Checkpoint:
    """The params of one Orbax item dir. `opened` records every array key read (for tests)."""

    def __init__(self, path: str, block_bytes: int = 64 << 20, read_threads: int = 4, prefetch: int = 1):
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
        self.use_zarr3 = bool(meta.get("use_zarr3", True))
        if "tree_metadata" in meta:
            self.keys = {tuple(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()}
        else:
            self.keys = self._list_keys()
        self.root = self._find_root()
        self.scanned = self._key("query", 0, scanned=True) in self.keys
        if self.scanned:
            self.num_layers = None  # from the shape of a stacked leaf
        else:
            idx = sorted({int(m.group(1)) for k in self.keys if len(k) > len(self.root) + 1
                          and k[:len(self.root)] == self.root and k[len(self.root)] == "decoder"
                          and (m := _LAYER_RE.match(k[len(self.root) + 1]))})
            if not idx:
                raise ConvertError(f"checkpoint {self.path} has no decoder layers under "
                                   f"{'/'.join(self.root + ('decoder',))} (neither 'layers' nor 'layers_0')")
            if idx != list(range(len(idx))):
                raise ConvertError(f"checkpoint {self.path}: decoder layers are not numbered 0..N-1 "
                                   f"(found {idx[:8]}...)")
            self.num_layers = len(idx)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                    "data_copy_concurrency": {"limit": read_threads},
                                    "file_io_concurrency": {"limit": read_threads}})
        self._stores: dict[tuple, object] = {}
        self.opened: list[str] = []
        self.bytes_read = 0
        self.check_leaves()
        if self.scanned:
            self.num_layers = self.shape("query")[1]

    # --- tree -------------------------------------------------------------------------------
    def _list_keys(self) -> set[tuple[str, ...]]:
        """Array keys from an ocdbt listing (when _METADATA is missing)."""
        if not self.use_ocdbt:
            raise ConvertError(f"{self.path}/_METADATA is missing: not an Orbax checkpoint item dir")
        kv = self._ts.KvStore.open({"driver": "ocdbt", "base": self._base()}).result()
        names = {k.decode()[: -len("/zarr.json")] for k in kv.list().result() if k.endswith(b"/zarr.json")}
        return {tuple(n.split(".")) for n in names}

    def _find_root(self) -> tuple[str, ...]:
        for root in ROOTS:
            if root + GLOBAL_LEAVES["embedding"] in self.keys:
                return root
        top = sorted({k[0] for k in self.keys if k})
        raise ConvertError(f"checkpoint {self.path} holds no MaxText params: no "
                           f"params/params/token_embedder/embedding (top-level keys: {top})")

    def _key(self, name: str, layer: int | None = None, scanned: bool | None = None) -> tuple[str, ...]:
        scanned = self.scanned if scanned is None else scanned
        if name in GLOBAL_LEAVES:
            return self.root + GLOBAL_LEAVES[name]
        where = ("decoder", "layers") if scanned else ("decoder", f"layers_{layer}")
        return self.root + where + LAYER_LEAVES[name]

    def leaf_path(self, name: str, layer: int | None = None) -> str:
        return "/".join(self._key(name, layer))

    def layer_ids(self) -> list[int | None]:
        """[None] for a scanned checkpoint (one stacked array per leaf), else 0..L-1."""
        return [None] if self.scanned else list(range(self.num_layers))

    def check_leaves(self) -> None:
        wanted = [self._key(n) for n in GLOBAL_LEAVES]
        for layer in ([None] if self.scanned else range(self.num_layers)):
            wanted += [self._key(n, layer) for n in LAYER_LEAVES]
        missing = ["/".join(k) for k in wanted if k not in self.keys]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ConvertError(f"checkpoint {self.path} is missing leaves: {', '.join(missing[:3])}{more}")

    # --- arrays -----------------------------------------------------------------------------
    def _base(self):
        if storage.is_remote(self.path):
            bucket, _, prefix = self.path.split("://", 1)[1].partition("/")
            return {"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/"}
        return {"driver": "file", "path": os.path.abspath(storage.local_path(self.path)) + "/"}

    def store(self, name: str, layer: int | None = None):
        key = self._key(name, layer)
        if key not in self._stores:
            assert not any(k in SKIPPED for k in key[: len(self.root) + 1]), key
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
                raise ConvertError(f"cannot open leaf {'/'.join(key)} in {self.path}: "
                                   f"{str(e).splitlines()[0]}") from None
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
        """(origin, block) over the whole leaf, each block a whole number of stored chunks."""
        st = self.store(name, layer)
        shape = tuple(st.shape)
        chunk = st.chunk_layout.read_chunk.shape or shape
        bshape = block_shape(shape, tuple(c or s for c, s in zip(chunk, shape)), whole_axes,
                             st.dtype.numpy_dtype.itemsize, self.block_bytes)

        def start(origin):
            idx = tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, bshape, shape))
            return origin, st[idx].read()

        origins = itertools.product(*(range(0, s, b) for s, b in zip(shape, bshape)))
        pending: collections.deque = collections.deque()

        def fill(n: int) -> None:
            while len(pending) < n and (o := next(origins, None)) is not None:
                pending.append(start(o))

        # Read the next block while the caller transforms this one, unless a single stored chunk
        # is already larger than the block budget (then one block at a time is all we can afford).
        ahead = self.prefetch if math.prod(bshape) * st.dtype.numpy_dtype.itemsize <= self.block_bytes else 0
        fill(1)
        while pending:
            origin, fut = pending.popleft()
            a = fut.result()
            self.bytes_read += a.nbytes
            fill(ahead)
            yield origin, a
            del a
            fill(1)


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

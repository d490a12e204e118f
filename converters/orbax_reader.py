"""Find the model params in a MaxText Orbax checkpoint and read them block by block.

Every layout MaxText (and Tunix on MaxText models) writes is found from `_METADATA` alone:

    Linen train state     params/params/{token_embedder,decoder}/...   (+ opt_state, step, nnx_aux, iter,
                          params/teacher_params: never read)
    Linen params          params/{token_embedder,decoder}/...
    NNX param-only        {token_embedder,decoder}/.../value            (pure_nnx, bf16; MaxText's default)
    Tunix SFT / RL        base/{token_embedder,decoder}/.../value       (+ rngs state: never read)

(MaxText: `checkpoint_conversion/utils/utils.py:detect_and_extract_checkpoint` for Linen / NNX-SFT /
NNX-RL, `utils/generate_param_only_checkpoint.py:_save_decode_checkpoint_nnx` for the `{"value": x}`
wrapping; NNX train states are saved in the Linen layout: `common/train_state_nnx.py`
to_linen_checkpoint_dict.) Layers are scanned
(`decoder/layers/...`, layer axis 1: `param_scan_axis: 1` in configs/base.yml) or unscanned
(`decoder/layers_{i}/...`, or `decoder/layers/{i}/...` for an nnx.List, which MaxText's
`param_key_parts_from_path` folds the same way).

The family is found from the leaves: q/k norm scales (`self_attention/query_norm`, `key_norm`)
make a Qwen3 dense layer, none a Llama. Every leaf under the model root must be one that
family's mapping consumes; anything else (biases, fused kernels, LoRA, quantized kernels, MoE
blocks, a pipeline layout) is refused with the leaf named, so that no model is ever written
from one that is not what the mapping assumes. NNX rng state under
the root is skipped, as MaxText's own `extract_nnx_weights` skips it.

The arrays are read with tensorstore (zarr3, or zarr v2 when `_METADATA` says `use_zarr3` is false
or does not say: orbax reads a missing field as False) over the ocdbt kvstore, so no jax or orbax
import is needed here. Reads follow the stored chunk grid: a block is a whole number of stored
chunks (never a slice of a chunk, which would decode the chunk again for every slice), except
that a chunk larger than the block budget is decoded as a stream, slab by slab (chunk_stream).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from typing import Iterator, NamedTuple

import numpy as np

from converters import ConvertError, chunk_stream, storage

# Per-layer leaves, relative to the layer (decoder/layers, decoder/layers_{i}, decoder/layers/{i}).
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
# Qwen3 (decoder_block qwen3): the Llama layer plus per-head q/k RMSNorm scales [head_dim]
# (layers/attentions.py creates query_norm/key_norm when use_qk_norm). A checkpoint is Qwen3
# when it holds them: the family comes from the leaves, never from a name.
QK_NORM_LEAVES: dict[str, tuple[str, ...]] = {
    "query_norm": ("self_attention", "query_norm", "scale"),
    "key_norm": ("self_attention", "key_norm", "scale"),
}
# Qwen3 MoE (decoder_block qwen3_moe, models/qwen3.py Qwen3MoeDecoderLayer): the MLP is a RoutedMoE
# (layers/moe.py): router gate/kernel [E, X] and stacked expert kernels wi_0/wi_1 [X, E, M], wo
# [X, M, E] (scanned: layer axis 1, [X, L, ...]); no dense mlp leaves.
MOE_LEAVES: dict[str, tuple[str, ...]] = {
    "moe_gate": ("moe_block", "gate", "kernel"),
    "moe_wi_0": ("moe_block", "wi_0"),
    "moe_wi_1": ("moe_block", "wi_1"),
    "moe_wo": ("moe_block", "wo"),
}
_ATTENTION = {k: v for k, v in LAYER_LEAVES.items() if k not in ("wi_0", "wi_1", "wo")}
FAMILY_LAYER_LEAVES = {"llama": LAYER_LEAVES, "qwen3": {**LAYER_LEAVES, **QK_NORM_LEAVES},
                       "qwen3_moe": {**_ATTENTION, **QK_NORM_LEAVES, **MOE_LEAVES}}
_ALL_LAYER_LEAVES = {**LAYER_LEAVES, **QK_NORM_LEAVES, **MOE_LEAVES}
# Leaves outside the layers, relative to the model root. "logits" is absent when the model
# uses logits_via_embedding (tied embeddings: layers/nnx_decoders.py creates no logits_dense).
GLOBAL_LEAVES: dict[str, tuple[str, ...]] = {
    "embedding": ("token_embedder", "embedding"),
    "final_norm": ("decoder", "decoder_norm", "scale"),
    "logits": ("decoder", "logits_dense", "kernel"),
}
OPTIONAL_LEAVES = ("logits",)
# Item dirs inside a step dir: CheckpointManager's "items", the emergency manager's "state",
# Tunix's "model_params" (common/checkpointing.py load_params_from_path knows the last two).
ITEM_DIRS = ("items", "state", "model_params")
# Where the model root may sit in the item tree, most specific first. A root under opt_state,
# optimizer or teacher_params is never one of these.
ROOTS = (("params", "params"), ("params",), ("base",), ())
_LAYER_RE = re.compile(r"^layers_(\d+)$")

# What an unexpected leaf under the model root implies (first match on a path component).
_HINTS = (
    (("query_norm", "key_norm"), "{leaf} without its partner: a Qwen3 layer has both query_norm and key_norm"),
    (("bias",), "biases (Qwen2-style attention_bias / mlp_bias) are not Llama weights"),
    (("qkv_proj",), "fused q/k/v (fused_qkv: true) is not the Llama layout"),
    (("wi",), "a fused MLP kernel (fused_mlp: true) is not the Llama layout"),
    (("pipeline_module",), "a pipeline-parallel layout (pipeline_module) is not supported: save it without pipeline stages"),
    (("lora", "lora_a", "lora_b", "kernel_lora_a", "kernel_lora_b"),
     "LoRA adapter weights: merge them into the base weights first"),
    (("qkernel", "AqtDotGeneral_0", "aqt", "qrhs"), "quantized kernels: convert the unquantized checkpoint"),
    (("MoeBlock_0", "moe_block", "experts", "gate"), "mixture-of-experts layers are not a dense Llama"),
    (("pre_ffw_norm", "post_ffw_norm", "post_self_attention_norm"), "Gemma-style norms are not Llama weights"),
)


def _is_rng_state(parts: tuple[str, ...]) -> bool:
    """NNX rng state (MaxText's extract_nnx_weights skips exactly these)."""
    return any(p == "rngs" or p == "to_nnx__rngs" or p.endswith("_rngs") for p in parts)


def resolve_items(path: str) -> str:
    """The item dir for PATH (PATH itself, or PATH/{items,state,model_params}); a one-line error otherwise."""
    path = path.rstrip("/")
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise ConvertError(f"--checkpoint {path}: no such file or directory")
    if _is_item_dir(fs, p):
        return path
    for name in ITEM_DIRS:
        if _is_item_dir(fs, f"{p}/{name}"):
            return storage.join(path, name)
    try:
        names = sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))
    except (NotADirectoryError, OSError):
        names = []
    steps = sorted(int(n) for n in names if n.isdigit())
    if steps:
        inner = next((n for n in ITEM_DIRS if fs.exists(f"{p}/{steps[-1]}/{n}")), "items")
        hint = f" (it holds steps {steps[-3:]}: pass {path}/{steps[-1]}/{inner})"
    else:
        hint = f" (it holds {names[:8]})" if names else " (it is empty)"
    raise ConvertError(f"--checkpoint {path} is not an Orbax checkpoint item dir: no _METADATA or manifest.ocdbt "
                       f"here or in {'/'.join(ITEM_DIRS)}{hint}")


def _is_item_dir(fs, p: str) -> bool:
    return fs.exists(p + "/_METADATA") or fs.exists(p + "/manifest.ocdbt")


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


class Checkpoint:
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
            self.keys = {tuple(str(k["key"]) for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
                         if not (v.get("value_metadata") or {}).get("skip_deserialize")}
        else:
            self.keys = self._list_keys()
        self.root, self.wrap = self._find_root()
        self.layout = {("params", "params"): "linen", ("params",): "linen", (): "nnx", ("base",): "tunix"}[self.root]
        self.scanned = self._key("query", 0, scanned=True) in self.keys
        self._layer_path = None
        if self.scanned:
            self.num_layers = None  # from the shape of a stacked leaf
        else:
            self.num_layers = self._find_unscanned_layers()
        self.family = "llama"
        if self._key("query_norm", 0) in self.keys:
            self.family = "qwen3_moe" if self._key("moe_gate", 0) in self.keys else "qwen3"
        self.layer_leaves = FAMILY_LAYER_LEAVES[self.family]
        self.tied = self._key("logits") not in self.keys
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

    # --- tree -------------------------------------------------------------------------------
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

    def _find_root(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        emb = GLOBAL_LEAVES["embedding"]
        for root in ROOTS:
            for wrap in ((), ("value",)):
                if root + emb + wrap in self.keys:
                    return root, wrap
        top = sorted({k[0] for k in self.keys if k})
        found = sorted("/".join(k) for k in self.keys if "token_embedder" in k)[:3]
        raise ConvertError(f"checkpoint {self.path} holds no MaxText model params: no token_embedder/embedding under "
                           f"params/params, params, base or the root (top-level keys: {top}"
                           + (f"; token_embedder only at {found}, never read" if found else "") + ")")

    def _find_unscanned_layers(self) -> int:
        dec = self.root + ("decoder",)
        n = len(dec)
        flat = {int(m.group(1)) for k in self.keys if len(k) > n and k[:n] == dec and (m := _LAYER_RE.match(k[n]))}
        listed = {int(k[n + 1]) for k in self.keys if len(k) > n + 1 and k[:n] == dec and k[n] == "layers"
                  and k[n + 1].isdigit()}
        if flat and listed:
            raise ConvertError(f"checkpoint {self.path} has both decoder/layers_N and decoder/layers/N leaves")
        idx = sorted(flat or listed)
        self._layer_path = "list" if listed else "attr"
        if not idx:
            under = sorted({k[n] for k in self.keys if len(k) > n and k[:n] == dec})
            raise ConvertError(f"checkpoint {self.path} has no decoder layers under {'/'.join(dec)} (neither "
                               f"'layers' nor 'layers_0'; found {under[:8]})")
        if idx != list(range(len(idx))):
            raise ConvertError(f"checkpoint {self.path}: decoder layers are not numbered 0..N-1 (found {idx[:8]}...)")
        return len(idx)

    def _key(self, name: str, layer: int | None = None, scanned: bool | None = None) -> tuple[str, ...]:
        scanned = self.scanned if scanned is None else scanned
        if name in GLOBAL_LEAVES:
            return self.root + GLOBAL_LEAVES[name] + self.wrap
        if scanned:
            where = ("decoder", "layers")
        elif self._layer_path == "list":
            where = ("decoder", "layers", str(layer))
        else:
            where = ("decoder", f"layers_{layer}")
        return self.root + where + _ALL_LAYER_LEAVES[name] + self.wrap

    def leaf_path(self, name: str, layer: int | None = None) -> str:
        return "/".join(self._key(name, layer))

    def layer_ids(self) -> list[int | None]:
        """[None] for a scanned checkpoint (one stacked array per leaf), else 0..L-1."""
        return [None] if self.scanned else list(range(self.num_layers))

    def wanted(self) -> list[tuple[str, ...]]:
        """Every key the Llama mapping reads."""
        keys = [self._key(n) for n in GLOBAL_LEAVES if not (n == "logits" and self.tied)]
        for layer in self.layer_ids():
            keys += [self._key(n, layer) for n in self.layer_leaves]
        return keys

    def check_leaves(self) -> None:
        """Refuse leaves the mapping would not consume (with what they imply), then missing ones."""
        wanted = self.wanted()
        n = len(self.root)
        extra = sorted(k for k in self.keys - set(wanted) if k[:n] == self.root and not _is_rng_state(k[n:]))
        if extra:
            first = "/".join(extra[0])
            hint = next((h.format(leaf=c) for names, h in _HINTS for c in extra[0][n:] if c in names),
                        "it is not a Llama or Qwen3 weight")
            more = f"; {len(extra)} such leaves, e.g. also {'/'.join(extra[1])}" if len(extra) > 1 else ""
            fam = {"llama": "Llama", "qwen3": "Qwen3", "qwen3_moe": "Qwen3 MoE"}[self.family]
            raise ConvertError(f"checkpoint {self.path}: leaf {first} is not consumed by the {fam} mapping: "
                               f"{hint}{more}; refusing to write a {fam} from it")
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


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


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

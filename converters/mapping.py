"""MaxText Llama tensors -> HF LlamaForCausalLM tensors, block by block, in float32.

    q_proj = reshape(query[E, H, D] -> de-interleave D -> x sqrt(D) if folded, [E, H*D]).T
    k_proj = reshape(key[E, K, D] -> de-interleave D, [E, K*D]).T   v_proj likewise, no permute
    o_proj = reshape(out[H, D, E], [H*D, E]).T
    gate/up/down = wi_0.T / wi_1.T / wo.T, norms as they are,
    embed_tokens = embedding[V, E], lm_head = logits_dense[E, V].T (untied)

RoPE: llama3.1 in MaxText rotates interleaved pairs (2i, 2i+1); HF rotates (i, i + D/2). Per
head along D, new = concat(x[0::2], x[1::2]) for q and k (v and o are untouched: the dot
product q.k is invariant under one permutation of both).

Query scale: upstream MaxText folds 1/sqrt(D) into the query kernel, so HF's q_proj must be
multiplied back by sqrt(D) ("fold"); some forks divide inside attention instead ("none").
There is no default: the caller must choose.

A block is any box of the stored array (scanned: layer axis 1). `pieces` turns one block into
(hf_name, destination index, float32 array) pieces; the writer casts each piece once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from converters import ConvertError
from converters.sizes import Dims

QUERY_SCALES = ("fold", "none")
ROPE_LAYOUTS = ("interleaved", "half")

_LAYER_HF = {
    "query": "self_attn.q_proj.weight",
    "key": "self_attn.k_proj.weight",
    "value": "self_attn.v_proj.weight",
    "out": "self_attn.o_proj.weight",
    "wi_0": "mlp.gate_proj.weight",
    "wi_1": "mlp.up_proj.weight",
    "wo": "mlp.down_proj.weight",
    "pre_norm": "input_layernorm.weight",
    "post_norm": "post_attention_layernorm.weight",
}
_GLOBAL_HF = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "logits": "lm_head.weight"}
# Axis holding D in the per-layer (unscanned) source shape: read whole, never split.
WHOLE_AXES = {"query": (2,), "key": (2,), "value": (2,), "out": (1,)}


@dataclasses.dataclass(frozen=True)
class Options:
    query_scale: str
    rope_layout: str = "interleaved"

    def __post_init__(self):
        if self.query_scale not in QUERY_SCALES:
            raise ConvertError(f"--query-scale must be one of {'|'.join(QUERY_SCALES)} (got {self.query_scale!r}): "
                               "'fold' if MaxText folded 1/sqrt(head_dim) into the query kernel (upstream), "
                               "'none' if it divides inside attention (the llama3.1-05b/1b/3b fork)")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ConvertError(f"--rope-layout must be one of {'|'.join(ROPE_LAYOUTS)} (got {self.rope_layout!r})")


def hf_name(leaf: str, layer: int | None) -> str:
    if leaf in _GLOBAL_HF:
        return _GLOBAL_HF[leaf]
    return f"model.layers.{layer}.{_LAYER_HF[leaf]}"


def source_shape(leaf: str, d: Dims, scanned: bool) -> tuple[int, ...]:
    """Shape MaxText stores for a leaf (scanned: layer axis inserted at 1)."""
    e, h, k, hd, m = d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp
    shape = {"query": (e, h, hd), "key": (e, k, hd), "value": (e, k, hd), "out": (h, hd, e),
             "wi_0": (e, m), "wi_1": (e, m), "wo": (m, e), "pre_norm": (e,), "post_norm": (e,),
             "embedding": (d.vocab, e), "final_norm": (e,), "logits": (e, d.vocab)}[leaf]
    if scanned and leaf in _LAYER_HF:
        shape = shape[:1] + (d.layers,) + shape[1:]
    return shape


def hf_tensors(d: Dims) -> list[tuple[str, tuple[int, ...], int | None]]:
    """Every HF tensor as (name, shape, layer or None), in file order."""
    e, m = d.emb, d.mlp
    hq, hk = d.heads * d.head_dim, d.kv_heads * d.head_dim
    out = [("model.embed_tokens.weight", (d.vocab, e), None)]
    for i in range(d.layers):
        for leaf, shape in (("query", (hq, e)), ("key", (hk, e)), ("value", (hk, e)), ("out", (e, hq)),
                            ("wi_0", (m, e)), ("wi_1", (m, e)), ("wo", (e, m)),
                            ("pre_norm", (e,)), ("post_norm", (e,))):
            out.append((hf_name(leaf, i), shape, i))
    out += [("model.norm.weight", (e,), None), ("lm_head.weight", (d.vocab, e), None)]
    return out


def whole_axes(leaf: str, scanned: bool) -> tuple[int, ...]:
    axes = WHOLE_AXES.get(leaf, ())
    return tuple(a + 1 if scanned and a >= 1 else a for a in axes)


def deinterleave(x: np.ndarray) -> np.ndarray:
    """Interleaved RoPE pairs (2i, 2i+1) on the last axis -> half-split (i, i + D/2)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def pieces(leaf: str, block: np.ndarray, origin: tuple[int, ...], layer: int | None, scanned: bool,
           d: Dims, opt: Options) -> Iterator[tuple[str, tuple[slice, ...], np.ndarray]]:
    """HF pieces of one source block. `layer` is the unscanned layer index (None if scanned)."""
    if scanned and leaf in _LAYER_HF:
        for j in range(block.shape[1]):
            yield from _layer_piece(leaf, block[:, j], origin[:1] + origin[2:], origin[1] + j, d, opt)
    else:
        yield from _layer_piece(leaf, block, origin, layer, d, opt)


def _layer_piece(leaf, x, org, layer, d: Dims, opt: Options):
    x = np.asarray(x, dtype=np.float32)
    D = d.head_dim
    name = hf_name(leaf, layer)
    if leaf in ("query", "key", "value"):  # [e, h, D] -> rows h*D, cols e
        if leaf != "value" and opt.rope_layout == "interleaved":
            x = deinterleave(x)
        if leaf == "query" and opt.query_scale == "fold":
            x = x * np.float32(math.sqrt(D))
        e, h, _ = x.shape
        y = x.transpose(1, 2, 0).reshape(h * D, e)
        yield name, (slice(org[1] * D, (org[1] + h) * D), slice(org[0], org[0] + e)), y
    elif leaf == "out":  # [h, D, e] -> rows e, cols h*D
        h, _, e = x.shape
        y = x.reshape(h * D, e).T
        yield name, (slice(org[2], org[2] + e), slice(org[0] * D, (org[0] + h) * D)), y
    elif leaf in ("wi_0", "wi_1", "wo", "logits"):  # plain transpose
        yield name, (slice(org[1], org[1] + x.shape[1]), slice(org[0], org[0] + x.shape[0])), x.T
    elif leaf == "embedding":
        yield name, (slice(org[0], org[0] + x.shape[0]), slice(org[1], org[1] + x.shape[1])), x
    else:  # norms
        yield name, (slice(org[0], org[0] + x.shape[0]),), x

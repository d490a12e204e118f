"""MaxText Llama / Qwen3 tensors -> HF LlamaForCausalLM / Qwen3ForCausalLM tensors, block by block, in float32.

A block is any box of the stored array (scanned: layer axis 1). `pieces` turns one block into
(hf_name, destination index, float32 array) pieces; the writer casts each piece once. Tensors
whose value depends on an `auto` convention are first written "raw" (no permutation, no scale)
to a float32 scratch; `finalize_rows` applies the chosen convention to rows of that raw tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from converters.conventions import Convention
from converters.sizes import Dims

# The mapping:
#     q_proj = reshape(query[E, H, D] -> de-interleave D -> x sqrt(D) if folded, [E, H*D]).T
#     k_proj = reshape(key[E, K, D] -> de-interleave D, [E, K*D]).T   v_proj likewise, no permute
#     o_proj = reshape(out[H, D, E], [H*D, E]).T
#     gate/up/down = wi_0.T / wi_1.T / wo.T, norms as they are,
#     embed_tokens = embedding[V, E], lm_head = logits_dense[E, V].T, or, with tied embeddings
#     (logits_via_embedding), lm_head = bf16(embedding) / sqrt(E) (the / sqrt(E) only with
#     normalize_embedding_logits)
#
# This is MaxText's own exporter (checkpoint_conversion/utils/param_mapping.py,
# LLAMA31_MAXTEXT_TO_HF_PARAM_HOOK_FN: scale_query_layer x sqrt(head_dim), adjust_rope evens/odds
# concatenated, reshape_kernel), with the query scale and the rotary layout as choices (see
# converters/conventions.py), plus the tied head: layers/decoders.py apply_output_head computes
# `attend_on_embedding(y, embedding)` then `/ sqrt(y.shape[-1])` when normalize_embedding_logits, and
# layers/embeddings.py attend_on_embedding casts the table to bfloat16 before the dot product; HF's
# tied weights cannot carry that scale or rounding, so the head is written untied.
#
# RoPE: per head along D, new = concat(x[0::2], x[1::2]) for q and k (v and o are untouched: the
# dot product q.k is invariant under one permutation of both).
#
# Qwen3 (layers/attentions.py with use_qk_norm): q_norm / k_norm = query_norm / key_norm scales [D]
# as they are (de-interleaved with q/k when the rotary layout is interleaved: the RMS over D does
# not depend on the order). MaxText does not fold the query scale with q/k norms (init_query_w:
# depth_scaling 1.0 when use_qk_norm) and multiplies q by query_pre_attn_scalar = head_dim**-0.5
# after RoPE, which is HF's own scaling: q_proj is the kernel as stored (query_scale "none").
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
    "query_norm": "self_attn.q_norm.weight",  # Qwen3 only
    "key_norm": "self_attn.k_norm.weight",
}
QK_NORMS = ("query_norm", "key_norm")
# Qwen3 MoE leaves (several HF tensors each): router kernel [E, X] -> mlp.gate.weight [X, E];
# expert kernels [X, E, M] / [X, M, E] -> mlp.experts.{j}.{gate,up,down}_proj.weight, transposed
# (MaxText's own exporter: checkpoint_conversion/utils/param_mapping.py QWEN3 mapping, moe_block-*).
MOE = ("moe_gate", "moe_wi_0", "moe_wi_1", "moe_wo")
_EXPERT_HF = {"moe_wi_0": "gate_proj", "moe_wi_1": "up_proj", "moe_wo": "down_proj"}
_LAYER_SOURCES = set(_LAYER_HF) | set(MOE)
_GLOBAL_HF = {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "logits": "lm_head.weight"}
LM_HEAD = "lm_head.weight"
# Axis holding D in the per-layer (unscanned) source shape: read whole, never split.
# Leaves whose first axis becomes separate HF tensors (the experts) or HF rows (the embedding): a
# stored chunk beyond the block budget is decoded slab by slab along it (orbax_reader). Every other
# leaf's first axis is the column axis of its transposed HF tensor: slabs would reach the writer
# as narrow column stripes of every layer's tensor, so their chunks are decoded whole.
SLAB_LEAVES = ("moe_wi_0", "moe_wi_1", "moe_wo", "embedding")
WHOLE_AXES = {"query": (2,), "key": (2,), "value": (2,), "out": (1,), "query_norm": (0,), "key_norm": (0,)}
# The identity convention: what a "raw" tensor is written with.
RAW = Convention(query_scale="none", rope_layout="half", rope_scaling="none", normalize="false")


@dataclasses.dataclass(frozen=True)
class Options:
    conv: Convention
    tied: bool = False


def hf_name(leaf: str, layer: int | None, expert: int | None = None) -> str:
    if leaf in _GLOBAL_HF:
        return _GLOBAL_HF[leaf]
    if leaf == "moe_gate":
        return f"model.layers.{layer}.mlp.gate.weight"
    if leaf in _EXPERT_HF:
        return f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERT_HF[leaf]}.weight"
    return f"model.layers.{layer}.{_LAYER_HF[leaf]}"


def source_shape(leaf: str, d: Dims, scanned: bool) -> tuple[int, ...]:
    """Shape MaxText stores for a leaf (scanned: layer axis inserted at 1)."""
    e, h, k, hd, m = d.emb, d.heads, d.kv_heads, d.head_dim, d.mlp
    shape = {"query": (e, h, hd), "key": (e, k, hd), "value": (e, k, hd), "out": (h, hd, e),
             "wi_0": (e, m), "wi_1": (e, m), "wo": (m, e), "pre_norm": (e,), "post_norm": (e,),
             "query_norm": (hd,), "key_norm": (hd,), "moe_gate": (e, d.experts), "moe_wi_0": (d.experts, e, m),
             "moe_wi_1": (d.experts, e, m), "moe_wo": (d.experts, m, e),
             "embedding": (d.vocab, e), "final_norm": (e,), "logits": (e, d.vocab)}[leaf]
    if scanned and leaf in _LAYER_SOURCES:
        shape = shape[:1] + (d.layers,) + shape[1:]
    return shape


def hf_tensors(d: Dims) -> list[tuple[str, tuple[int, ...], int | None]]:
    """Every HF tensor as (name, shape, layer or None), in file order (lm_head always untied)."""
    e, m = d.emb, d.mlp
    hq, hk = d.heads * d.head_dim, d.kv_heads * d.head_dim
    out = [("model.embed_tokens.weight", (d.vocab, e), None)]
    mlp = (("wi_0", (m, e)), ("wi_1", (m, e)), ("wo", (e, m))) if d.family != "qwen3_moe" else ()
    for i in range(d.layers):
        for leaf, shape in (("query", (hq, e)), ("key", (hk, e)), ("value", (hk, e)), ("out", (e, hq)),
                            *mlp, ("pre_norm", (e,)), ("post_norm", (e,))):
            out.append((hf_name(leaf, i), shape, i))
        if d.family != "llama":
            out += [(hf_name(leaf, i), (d.head_dim,), i) for leaf in QK_NORMS]
        if d.family == "qwen3_moe":
            out.append((hf_name("moe_gate", i), (d.experts, e), i))
            for j in range(d.experts):
                out += [(hf_name(leaf, i, j), shape, i) for leaf, shape in
                        (("moe_wi_0", (m, e)), ("moe_wi_1", (m, e)), ("moe_wo", (e, m)))]
    out += [("model.norm.weight", (e,), None), (LM_HEAD, (d.vocab, e), None)]
    return out


def deferred(layers: int, tied: bool, auto: set[str], family: str = "llama") -> list[tuple[str, str]]:
    """(hf_name, kind) of the tensors whose value depends on an `auto` option; kind:
    q|k|lm_head|norm (a Qwen3 q/k norm scale, permuted with its q/k)."""
    out = []
    for i in range(layers):
        if auto & {"query_scale", "rope_layout"}:
            out.append((hf_name("query", i), "q"))
        if "rope_layout" in auto:
            out.append((hf_name("key", i), "k"))
            if family != "llama":
                out += [(hf_name(leaf, i), "norm") for leaf in QK_NORMS]
    if tied and "normalize" in auto:
        out.append((LM_HEAD, "lm_head"))
    return out


def plain(leaf: str, tied: bool) -> bool:
    """Leaves that are only reshaped/transposed (no arithmetic): they may be read already cast to
    the output dtype (tensorstore's casts round like numpy's: round to nearest even)."""
    return leaf in ("value", "out", "wi_0", "wi_1", "wo", "logits", "pre_norm", "post_norm", "final_norm", *MOE) or (
        leaf == "embedding" and not tied)


def whole_axes(leaf: str, scanned: bool) -> tuple[int, ...]:
    axes = WHOLE_AXES.get(leaf, ())
    return tuple(a + 1 if scanned and a >= 1 else a for a in axes)


def deinterleave(x: np.ndarray) -> np.ndarray:
    """Interleaved RoPE pairs (2i, 2i+1) on the last axis -> half-split (i, i + D/2)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (as jnp.asarray(x, jnp.bfloat16) does), kept as float32."""
    import ml_dtypes

    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def pieces(leaf: str, block: np.ndarray, origin: tuple[int, ...], layer: int | None, scanned: bool,
           d: Dims, opt: Options, raw: frozenset = frozenset()
           ) -> Iterator[tuple[str, tuple[slice, ...], np.ndarray, bool]]:
    """HF pieces (name, index, array, is_raw) of one source block. `layer` is the unscanned layer
    index (None if scanned). Names in `raw` are produced with the identity convention."""
    if scanned and leaf in _LAYER_SOURCES:
        for j in range(block.shape[1]):
            yield from _layer_piece(leaf, block[:, j], origin[:1] + origin[2:], origin[1] + j, d, opt, raw)
    else:
        yield from _layer_piece(leaf, block, origin, layer, d, opt, raw)


def _layer_piece(leaf, x, org, layer, d: Dims, opt: Options, raw):
    x = np.asarray(x)  # float32 math below; leaves in PLAIN may arrive already cast (no math on them)
    if leaf in ("query", "key") or (leaf == "embedding" and opt.tied):
        x = x.astype(np.float32, copy=False)
    if leaf in MOE:  # plain transposes, nothing that depends on a convention
        yield from _moe_pieces(leaf, x, org, layer)
        return
    D = d.head_dim
    name = hf_name(leaf, layer)
    is_raw = name in raw
    conv = RAW if is_raw else opt.conv
    if leaf in ("query", "key", "value"):  # [e, h, D] -> rows h*D, cols e
        if leaf != "value" and conv.rope_layout == "interleaved":
            x = deinterleave(x)
        if leaf == "query" and conv.query_scale == "fold":
            x = x * np.float32(math.sqrt(D))
        e, h, _ = x.shape
        y = x.reshape(e, h * D).T  # a transposed view: the writer transposes it in tiles
        yield name, (slice(org[1] * D, (org[1] + h) * D), slice(org[0], org[0] + e)), y, is_raw
    elif leaf == "out":  # [h, D, e] -> rows e, cols h*D
        h, _, e = x.shape
        y = x.reshape(h * D, e).T
        yield name, (slice(org[2], org[2] + e), slice(org[0] * D, (org[0] + h) * D)), y, is_raw
    elif leaf in ("wi_0", "wi_1", "wo", "logits"):  # plain transpose
        yield name, (slice(org[1], org[1] + x.shape[1]), slice(org[0], org[0] + x.shape[0])), x.T, is_raw
    elif leaf == "embedding":
        index = (slice(org[0], org[0] + x.shape[0]), slice(org[1], org[1] + x.shape[1]))
        yield name, index, x, is_raw
        if opt.tied:
            head_raw = LM_HEAD in raw
            yield LM_HEAD, index, tied_head(x, d, RAW if head_raw else opt.conv), head_raw
    elif leaf in QK_NORMS:  # Qwen3 [D] scale of a per-head RMSNorm before RoPE: permuted like q/k
        if conv.rope_layout == "interleaved":
            x = deinterleave(x)
        yield name, (slice(0, x.shape[0]),), x, is_raw
    else:  # norms
        yield name, (slice(org[0], org[0] + x.shape[0]),), x, is_raw


def _moe_pieces(leaf, x, org, layer):
    """A block of a router kernel [e, X] or of stacked expert kernels [x, e, m] / [x, m, e]: each
    expert's piece goes to its own HF tensor (so a block holds any number of experts: memory is
    bounded by the block, not by the layer's experts)."""
    if leaf == "moe_gate":
        yield hf_name(leaf, layer), (slice(org[1], org[1] + x.shape[1]), slice(org[0], org[0] + x.shape[0])), x.T, False
        return
    for a in range(x.shape[0]):
        y = x[a]  # [e, m] (wi_0/wi_1) or [m, e] (wo): HF stores the transpose
        yield (hf_name(leaf, layer, org[0] + a), (slice(org[2], org[2] + y.shape[1]), slice(org[1], org[1] + y.shape[0])),
               y.T, False)


def tied_head(emb_rows: np.ndarray, d: Dims, conv: Convention) -> np.ndarray:
    """lm_head rows from embedding rows: bfloat16-rounded, / sqrt(E) when normalized (see the mapping above)."""
    y = bf16_round(emb_rows)
    if conv.normalize == "true":
        y = y / np.float32(math.sqrt(d.emb))
    return y


def finalize_rows(kind: str, rows: np.ndarray, d: Dims, conv: Convention) -> np.ndarray:
    """Apply `conv` to raw rows (whole heads for q/k) of a deferred tensor; float32 in and out."""
    if kind == "lm_head":  # raw = bf16_round(embedding)
        return rows / np.float32(math.sqrt(d.emb)) if conv.normalize == "true" else rows
    D = d.head_dim
    if kind == "norm":
        return np.ascontiguousarray(deinterleave(rows) if conv.rope_layout == "interleaved" else rows, np.float32)
    if rows.shape[0] % D:
        raise AssertionError("finalize_rows needs whole heads")
    y = rows.reshape(-1, D, rows.shape[1])
    if conv.rope_layout == "interleaved":
        y = y[:, np.r_[0:D:2, 1:D:2], :]
    y = y.reshape(rows.shape)
    if kind == "q" and conv.query_scale == "fold":
        y = y * np.float32(math.sqrt(D))
    return np.ascontiguousarray(y, dtype=np.float32)


def unfinalize_rows(kind: str, rows: np.ndarray, d: Dims, conv: Convention) -> np.ndarray:
    """The inverse of finalize_rows: raw rows from rows written with `conv` (the verifier scores
    every convention from a converted model this way); float32 in and out."""
    D = d.head_dim
    y = np.asarray(rows, dtype=np.float32)
    if kind == "lm_head":
        return y * np.float32(math.sqrt(d.emb)) if conv.normalize == "true" else y
    if kind == "norm":
        y = y.reshape(1, D, 1)  # one head's scale, handled as rows below
    if kind == "q" and conv.query_scale == "fold":
        y = y / np.float32(math.sqrt(D))
    if conv.rope_layout == "interleaved":
        out = np.empty_like(y).reshape(-1, D, y.shape[-1])
        out[:, np.r_[0:D:2, 1:D:2], :] = y.reshape(-1, D, y.shape[-1])
        y = out.reshape(y.shape)
    return y.reshape(-1) if kind == "norm" else y

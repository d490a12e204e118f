"""An independent numpy forward of the MaxText Llama and Qwen3 dense parameterisations (float64).

It works on the MaxText tensors as stored (query [E, H, D], out [H, D, E], ...) and follows
MaxText's own code, not the HF mapping (it shares no code with converters/mapping.py or
converters/probe.py): a converted model whose logits match this forward was converted right.

`load_params` reads the checkpoint through orbax's own restore API (not converters.orbax_reader).
"""

from __future__ import annotations

import math

import numpy as np

from converters.orbax_tree import GLOBAL_LEAVES
from converters.sizes import Dims

LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def inv_freq(head_dim: int, theta: float, rope_scaling: str) -> np.ndarray:
    fraction = 2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim
    freq = 1.0 / theta**fraction
    if rope_scaling == "llama3":  # MaxText LLaMARotaryEmbedding._apply_scaling_factor
        s = LLAMA3
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        out = []
        for f in freq:
            wl = 2 * math.pi / f
            if wl < high_wl:
                out.append(f)
            elif wl > low_wl:
                out.append(f / s["factor"])
            else:
                smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                out.append((1 - smooth) * f / s["factor"] + smooth * f)
        freq = np.array(out)
    elif rope_scaling != "none":
        raise ValueError(f"rope_scaling must be llama3|none, got {rope_scaling!r}")
    return freq


def rope(x: np.ndarray, pos: np.ndarray, freq: np.ndarray, layout: str) -> np.ndarray:
    """x [T, heads, D]; interleaved rotates (2i, 2i+1), half rotates (i, i + D/2)."""
    ang = pos[:, None] * freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = a * cos - b * sin
        y[..., 1::2] = b * cos + a * sin
        return y
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_params(p: dict, i: int) -> dict:
    """Layer i of params in either layout: p['layers'] is a list of dicts or a dict of stacked arrays."""
    layers = p["layers"]
    if isinstance(layers, list):
        return layers[i]
    return {k: np.take(v, i, axis=1) for k, v in layers.items()}


def moe(h: np.ndarray, w: dict, k: int) -> np.ndarray:
    """layers/moe.py RoutedMoE for qwen3_moe: gate logits = h @ gate [E, X]; get_topk takes the top k
    logits (jax.lax.top_k: ties to the lower index), softmax over those k, then norm_topk_prob
    divides by their sum (1); output = sum of weight x expert SwiGLU (wi_0 [X, E, M], wi_1, wo [X, M, E])."""
    logits = h @ w["moe_gate"]
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    tl = np.take_along_axis(logits, top, -1)
    wts = np.exp(tl - tl.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    wts /= wts.sum(-1, keepdims=True)  # norm_topk_prob
    out = np.zeros_like(h)
    for j in range(w["moe_gate"].shape[1]):
        rows, slot = np.nonzero(top == j)
        if len(rows):
            g = h[rows] @ w["moe_wi_0"][j]
            y = ((g / (1 + np.exp(-g))) * (h[rows] @ w["moe_wi_1"][j])) @ w["moe_wo"][j]
            out[rows] += wts[rows, slot, None] * y
    return out


# What `forward` follows in MaxText:
# * rotary: "interleaved" is layers/embeddings.py LLaMARotaryEmbedding (pairs (2i, 2i+1), used for
#   names llama3.1*), "half" is RotaryEmbedding (rotate_half on (i, i + D/2), every other name);
#   llama3 scaling is LLaMARotaryEmbedding._apply_scaling_factor;
# * Qwen3 (q/k norm leaves present): models/qwen3.py AttentionWithNorm builds Attention with
#   use_qk_norm and query_pre_attn_scalar = head_dim**-0.5; attentions.py __call__ applies
#   query_norm/key_norm (RMSNorm over head_dim) to the projections, then RoPE, then multiplies q by
#   the scalar ("none" below);
# * query scale: "fold" = MaxText's init_query_w (layers/attentions.py) with no 1/sqrt(D) in the
#   attention (attention_op.py uses scale 1.0); "none" divides q by sqrt(D) inside attention;
# * head: logits_dense, or with tied embeddings (logits_via_embedding) layers/embeddings.py
#   attend_on_embedding, which casts the table to bfloat16, then layers/decoders.py
#   apply_output_head's `/ sqrt(emb)` when normalize_embedding_logits.
def forward(p: dict, tokens, d: Dims, query_scale: str, rope_scaling: str, rope_layout: str = "interleaved",
            normalize_embedding_logits: bool = True) -> np.ndarray:
    """Logits [T, V] for one sequence. p: {'embedding', 'final_norm', 'logits' (absent or None when
    tied), 'layers'} (MaxText shapes)."""
    if query_scale not in ("fold", "none"):
        raise ValueError(f"query_scale must be fold|none, got {query_scale!r}")
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    tokens = np.asarray(tokens)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    freq = inv_freq(d.head_dim, d.rope_theta, rope_scaling)
    x = f64(p["embedding"])[tokens]
    group = d.heads // d.kv_heads
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(d.layers):
        w = {k: f64(v) for k, v in layer_params(p, i).items()}
        h = rms_norm(x, w["pre_norm"], d.rms_norm_eps)
        # matmuls, not np.einsum: einsum's own loops (no BLAS) were most of the verifier's time
        q = (h @ w["query"].reshape(d.emb, -1)).reshape(T, d.heads, d.head_dim)  # te,ehd->thd
        k = (h @ w["key"].reshape(d.emb, -1)).reshape(T, d.kv_heads, d.head_dim)
        v = (h @ w["value"].reshape(d.emb, -1)).reshape(T, d.kv_heads, d.head_dim)
        if "query_norm" in w:  # Qwen3: attentions.py applies query_norm/key_norm (RMSNorm over D) before RoPE
            q, k = rms_norm(q, w["query_norm"], d.rms_norm_eps), rms_norm(k, w["key_norm"], d.rms_norm_eps)
        q, k = rope(q, pos, freq, rope_layout), rope(k, pos, freq, rope_layout)
        if query_scale == "none":  # the fork divides inside attention (Qwen3: q * query_pre_attn_scalar,
            q = q / math.sqrt(d.head_dim)  # head_dim**-0.5, after RoPE); "fold": already in the kernel
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        s = q.transpose(1, 0, 2) @ k.transpose(1, 2, 0) + mask  # thd,shd->hts
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = s @ v.transpose(1, 0, 2)  # hts,shd->htd
        x = x + o.transpose(1, 0, 2).reshape(T, -1) @ w["out"].reshape(-1, w["out"].shape[-1])  # thd,hde->te
        h = rms_norm(x, w["post_norm"], d.rms_norm_eps)
        if "moe_gate" in w:
            x = x + moe(h, w, d.experts_per_token)
            continue
        g = h @ w["wi_0"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ w["wi_1"])) @ w["wo"]
    x = rms_norm(x, f64(p["final_norm"]), d.rms_norm_eps)
    if p.get("logits") is not None:
        return x @ f64(p["logits"])
    import ml_dtypes  # attend_on_embedding: jnp.asarray(embedding_table, jnp.bfloat16)

    table = np.asarray(p["embedding"], np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    logits = x @ table.T
    return logits / math.sqrt(x.shape[-1]) if normalize_embedding_logits else logits


def load_params(path: str) -> tuple[dict, Dims]:
    """All model params of an Orbax item dir via orbax's own restore (small models: tests, verifier)."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import orbax.checkpoint as ocp

    from converters.orbax_reader import Checkpoint

    ck = Checkpoint(path)  # only to locate the params (root, layout, leaf paths) and check the leaves
    items = os.path.abspath(ck.path) if "://" not in ck.path else ck.path
    pc = ocp.PyTreeCheckpointer()
    meta = pc.metadata(items)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    keys = ck.wanted()

    def get(node, key):
        for k in key:
            node = node[int(k)] if isinstance(node, list) else node[k]
        return node

    want: dict = {}
    for key in keys:  # a tree of exactly the leaves to read (never opt_state, rng state, ...)
        node = want
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = get(tree, key)
    ra = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), want)
    got = pc.restore(items, args=ocp.args.PyTreeRestore(item=want, restore_args=ra, partial_restore=True))
    leaf = lambda name, layer=None: np.asarray(get(got, ck.key(name, layer)))  # noqa: E731
    p = {n: leaf(n) for n in GLOBAL_LEAVES if not (n == "logits" and ck.tied)}
    if ck.scanned:
        p["layers"] = {n: leaf(n) for n in ck.layer_leaves}
    else:
        p["layers"] = [{n: leaf(n, i) for n in ck.layer_leaves} for i in range(ck.num_layers)]
    from converters.convert import dims_of

    return p, dims_of(ck)

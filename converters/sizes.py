"""Model sizes (MaxText's Llama and Qwen3 dense names) and dims inferred from checkpoint shapes.

Dims come from MaxText's `src/maxtext/configs/models/<name>.yml` (base_emb_dim, base_num_query_heads,
base_num_kv_heads, base_num_decoder_layers, base_mlp_dim, head_dim, vocab_size,
normalization_layer_epsilon, rope_max_timescale). The RoPE of a name follows MaxText's
`layers/attentions.py:init_rotary_embedding`: only names starting with "llama3.1" get
LLaMARotaryEmbedding (interleaved pairs, llama3 frequency scaling when `rope_use_scale`, which
configs/base.yml sets true); every other Llama name gets RotaryEmbedding (half-split, no llama3
scaling). So llama3.3-70b and llama3.2-* run WITHOUT llama3 scaling in MaxText, whatever the
original Meta model used.
"""

from __future__ import annotations

import dataclasses

from converters import ConvertError


@dataclasses.dataclass(frozen=True)
class Dims:
    vocab: int
    emb: int  # hidden size E
    layers: int  # L
    heads: int  # H (query heads)
    kv_heads: int  # K
    head_dim: int  # D (H * D need not equal E)
    mlp: int  # M
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    family: str = "llama"  # "llama" | "qwen3" (q/k RMSNorm per head) | "qwen3_moe": found from the leaves
    experts: int = 0  # qwen3_moe: routed experts X (mlp is then each expert's intermediate size)
    experts_per_token: int = 0  # qwen3_moe: top-k (num_experts_per_tok: a config value, not in the checkpoint)

    def layer_bytes(self, itemsize: int) -> int:
        """Bytes of one decoder layer's HF tensors at the given element size."""
        e, hd, kd, m = self.emb, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.mlp
        qk = 2 * self.head_dim if self.family != "llama" else 0
        mlp = 3 * e * m * max(1, self.experts) + e * self.experts
        return itemsize * (2 * e * hd + 2 * e * kd + mlp + 2 * e + qk)


@dataclasses.dataclass(frozen=True)
class Size:
    dims: Dims
    rope_layout: str  # "interleaved" | "half" (MaxText's rotary choice for the name)
    rope_scaling: str | None  # "llama3" | "none"; None: the defining config does not pin it
    source: str
    normalize: str | None = None  # tied head: normalize_embedding_logits the config pins ("true"/"false")


def rope_layout_of(name: str) -> str:
    """MaxText layers/attentions.py init_rotary_embedding: `model_name.startswith("llama3.1")`."""
    return "interleaved" if name.startswith("llama3.1") else "half"


_V = dict(vocab=128256)
_UP = "AI-Hypercomputer/maxtext src/maxtext/configs/models/{}.yml"
_FORK = "the MaxText fork that defines {} (rope_use_scale: False by default there)"
_L32 = "Llama 3.2 dims (a MaxText fork's configs/models/{}.yml; upstream MaxText has no llama3.2 config)"


def _size(name, source, scaling, **dims) -> Size:
    return Size(Dims(**_V, **dims), rope_layout_of(name), scaling, source.format(name))


SIZES: dict[str, Size] = {
    # The fork's small llama3.1 names: interleaved (the name), rope scaling not pinned: pass it.
    "llama3.1-05b": _size("llama3.1-05b", _FORK, None, emb=1024, layers=12, heads=32, kv_heads=8, head_dim=128, mlp=8192),
    "llama3.1-1b": _size("llama3.1-1b", _FORK, None, emb=2048, layers=16, heads=32, kv_heads=8, head_dim=128, mlp=8192),
    "llama3.1-3b": _size("llama3.1-3b", _FORK, None, emb=3072, layers=28, heads=32, kv_heads=8, head_dim=128, mlp=8192),
    # Upstream llama3.1: LLaMARotaryEmbedding with use_scale = rope_use_scale (true in base.yml).
    "llama3.1-8b": _size("llama3.1-8b", _UP, "llama3", emb=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=14336),
    "llama3.1-70b": _size("llama3.1-70b", _UP, "llama3", emb=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
                          mlp=28672),
    "llama3.1-405b": _size("llama3.1-405b", _UP, "llama3", emb=16384, layers=126, heads=128, kv_heads=8, head_dim=128,
                           mlp=53248),
    # Other names: RotaryEmbedding (half-split, no llama3 scaling).
    "llama3-8b": _size("llama3-8b", _UP, "none", emb=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=14336),
    "llama3-70b": _size("llama3-70b", _UP, "none", emb=8192, layers=80, heads=64, kv_heads=8, head_dim=128, mlp=28672),
    "llama3-405b": _size("llama3-405b", _UP, "none", emb=16384, layers=126, heads=128, kv_heads=8, head_dim=128,
                         mlp=53248),
    "llama3.3-70b": _size("llama3.3-70b", _UP, "none", emb=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
                          mlp=28672),
    "llama3.2-1b": _size("llama3.2-1b", _L32, "none", emb=2048, layers=16, heads=32, kv_heads=8, head_dim=64, mlp=8192),
    "llama3.2-3b": _size("llama3.2-3b", _L32, "none", emb=3072, layers=28, heads=24, kv_heads=8, head_dim=128, mlp=8192),
}


# Qwen3 dense (src/maxtext/configs/models/qwen3-*.yml, decoder_block "qwen3"): head_dim 128, vocab
# 151936, eps 1e-6, rope_max_timescale 1e6, RotaryEmbedding (half-split; no llama3 scaling: only
# names starting with "llama3.1" get LLaMARotaryEmbedding), normalize_embedding_logits false;
# 0.6b/1.7b/4b tie the head (logits_via_embedding: true).
_Q = "AI-Hypercomputer/maxtext src/maxtext/configs/models/{}.yml"


def _qwen3(name, **dims) -> Size:
    d = Dims(vocab=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, family="qwen3", **dims)
    return Size(d, "half", "none", _Q.format(name), normalize="false")


def _qwen3_moe(name, theta, **dims) -> Size:
    d = Dims(vocab=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=theta, family="qwen3_moe", experts=128,
             experts_per_token=8, **dims)
    return Size(d, "half", "none", _Q.format(name), normalize="false")


SIZES.update({
    "qwen3-0.6b": _qwen3("qwen3-0.6b", emb=1024, layers=28, heads=16, kv_heads=8, mlp=3072),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", emb=2048, layers=28, heads=16, kv_heads=8, mlp=6144),
    "qwen3-4b": _qwen3("qwen3-4b", emb=2560, layers=36, heads=32, kv_heads=8, mlp=9728),
    "qwen3-8b": _qwen3("qwen3-8b", emb=4096, layers=36, heads=32, kv_heads=8, mlp=12288),
    "qwen3-14b": _qwen3("qwen3-14b", emb=5120, layers=40, heads=40, kv_heads=8, mlp=17408),
    "qwen3-32b": _qwen3("qwen3-32b", emb=5120, layers=64, heads=64, kv_heads=8, mlp=25600),
    # qwen3_moe: 128 experts, 8 per token, norm_topk_prob; rope_max_timescale 1e7 / 5e6
    "qwen3-30b-a3b": _qwen3_moe("qwen3-30b-a3b", 1e7, emb=2048, layers=48, heads=32, kv_heads=4, mlp=768),
    "qwen3-235b-a22b": _qwen3_moe("qwen3-235b-a22b", 5e6, emb=4096, layers=94, heads=64, kv_heads=4, mlp=1536),
})


def named(size: str) -> Size:
    if size not in SIZES:
        raise ConvertError(f"--model-size {size!r} is unknown; choose one of {', '.join(SIZES)} "
                           "or leave it out to infer the shapes from the checkpoint")
    return SIZES[size]


def infer(shapes: dict[str, tuple[int, ...]], layers: int, scanned: bool, family: str = "llama",
          **overrides) -> Dims:
    """Dims from MaxText leaf shapes, keyed by the names in orbax_tree.LAYER_LEAVES ('query', ...)."""
    q = shapes["query"]
    k = shapes["key"]
    drop = (lambda s: s[:1] + s[2:]) if scanned else (lambda s: s)
    e, h, d = drop(q)
    _, kh, _ = drop(k)
    experts = 0
    if family == "qwen3_moe":
        experts, _, m = drop(shapes["moe_wi_0"])
    else:
        _, m = drop(shapes["wi_0"])
    v, _ = shapes["embedding"]
    base = Dims(vocab=v, emb=e, layers=layers, heads=h, kv_heads=kh, head_dim=d, mlp=m, family=family,
                experts=experts)
    if family != "llama":  # MaxText's qwen3 configs: normalization_layer_epsilon 1e-6, rope_max_timescale 1e6
        base = dataclasses.replace(base, rms_norm_eps=1e-6, rope_theta=1e6)
    return dataclasses.replace(base, **overrides)


def check(expected: Dims, found: Dims, flag: str, where: str) -> None:
    """Raise one clear line naming the first field where the named size and the checkpoint differ."""
    for f in ("family", "vocab", "emb", "layers", "heads", "kv_heads", "head_dim", "mlp", "experts"):
        a, b = getattr(expected, f), getattr(found, f)
        if a != b:
            guess = matching(found)
            hint = f"pass --model-size {guess[0]}" if guess else "leave --model-size out to infer the shapes"
            raise ConvertError(f"{flag} expects {f}={a} but the checkpoint {where} has {f}={b}; {hint}")


def matching(d: Dims) -> list[str]:
    """Size names whose dims equal d's (several names can share dims: llama3.1-70b, llama3.3-70b)."""
    return [n for n, s in SIZES.items() if _shape_key(s.dims) == _shape_key(d)]


def _shape_key(d: Dims) -> tuple:
    return (d.family, d.vocab, d.emb, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp, d.experts)

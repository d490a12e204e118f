"""Model sizes: the llama3.1 table and dims inferred from checkpoint shapes."""

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
    max_position_embeddings: int = 131072

    def layer_bytes(self, itemsize: int) -> int:
        """Bytes of one decoder layer's HF tensors at the given element size."""
        e, hd, kd, m = self.emb, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.mlp
        return itemsize * (2 * e * hd + 2 * e * kd + 3 * e * m + 2 * e)


_LLAMA31 = dict(vocab=128256, heads=32, kv_heads=8, head_dim=128, mlp=8192)

SIZES: dict[str, Dims] = {
    "llama3.1-05b": Dims(emb=1024, layers=12, **_LLAMA31),
    "llama3.1-1b": Dims(emb=2048, layers=16, **_LLAMA31),
    "llama3.1-3b": Dims(emb=3072, layers=28, **_LLAMA31),
    "llama3.1-8b": Dims(**{**_LLAMA31, "mlp": 14336}, emb=4096, layers=32),
    "llama3.1-70b": Dims(**{**_LLAMA31, "mlp": 28672, "heads": 64}, emb=8192, layers=80),
}


def named(size: str) -> Dims:
    if size not in SIZES:
        raise ConvertError(f"--model-size {size!r} is unknown; choose one of {', '.join(SIZES)} "
                           "or leave it out to infer the shapes from the checkpoint")
    return SIZES[size]


def infer(shapes: dict[str, tuple[int, ...]], layers: int, scanned: bool, **overrides) -> Dims:
    """Dims from MaxText leaf shapes, keyed by the names in orbax_reader.LEAVES ('query', ...)."""
    q = shapes["query"]
    k = shapes["key"]
    wi = shapes["wi_0"]
    drop = (lambda s: s[:1] + s[2:]) if scanned else (lambda s: s)
    e, h, d = drop(q)
    _, kh, _ = drop(k)
    _, m = drop(wi)
    v, _ = shapes["embedding"]
    return dataclasses.replace(Dims(vocab=v, emb=e, layers=layers, heads=h, kv_heads=kh, head_dim=d,
                                    mlp=m), **overrides)


def check(expected: Dims, found: Dims, flag: str, where: str) -> None:
    """Raise one clear line naming the first field where the named size and the checkpoint differ."""
    for f in ("vocab", "emb", "layers", "heads", "kv_heads", "head_dim", "mlp"):
        a, b = getattr(expected, f), getattr(found, f)
        if a != b:
            guess = [n for n, s in SIZES.items() if _shape_key(s) == _shape_key(found)]
            hint = f"pass --model-size {guess[0]}" if guess else "leave --model-size out to infer the shapes"
            raise ConvertError(f"{flag} expects {f}={a} but the checkpoint {where} has {f}={b}; {hint}")


def _shape_key(d: Dims) -> tuple:
    return (d.vocab, d.emb, d.layers, d.heads, d.kv_heads, d.head_dim, d.mlp)

"""Where the model is in a MaxText Orbax item tree, found from the array keys alone.

`resolve_items` finds the item dir; `ParamTree` finds the model root (Linen train state, Linen
params, NNX param-only or Tunix), the layers (scanned or not), the family (Llama, Qwen3 dense,
Qwen3 MoE) and the tied head, and refuses leaves its family's mapping would not consume. It reads
no tensor data (orbax_reader.Checkpoint adds the arrays).
"""

from __future__ import annotations

import os
import re

from converters import ConvertError, storage

# Every layout MaxText (and Tunix on MaxText models) writes, as found from `_METADATA`:
#
#     Linen train state     params/params/{token_embedder,decoder}/...   (+ opt_state, step, nnx_aux, iter,
#                           params/teacher_params: never read)
#     Linen params          params/{token_embedder,decoder}/...
#     NNX param-only        {token_embedder,decoder}/.../value            (pure_nnx, bf16; MaxText's default)
#     Tunix SFT / RL        base/{token_embedder,decoder}/.../value       (+ rngs state: never read)
#
# (MaxText: `checkpoint_conversion/utils/utils.py:detect_and_extract_checkpoint` for Linen / NNX-SFT /
# NNX-RL, `utils/generate_param_only_checkpoint.py:_save_decode_checkpoint_nnx` for the `{"value": x}`
# wrapping; NNX train states are saved in the Linen layout: `common/train_state_nnx.py`
# to_linen_checkpoint_dict.) Layers are scanned (`decoder/layers/...`, layer axis 1: `param_scan_axis: 1`
# in configs/base.yml) or unscanned (`decoder/layers_{i}/...`, or `decoder/layers/{i}/...` for an
# nnx.List, which MaxText's `param_key_parts_from_path` folds the same way).
#
# The family is found from the leaves: q/k norm scales (`self_attention/query_norm`, `key_norm`)
# make a Qwen3 dense layer, none a Llama. Every leaf under the model root must be one that family's
# mapping consumes; anything else (biases, fused kernels, LoRA, quantized kernels, MoE blocks, a
# pipeline layout) is refused with the leaf named, so that no model is ever written from one that is
# not what the mapping assumes. NNX rng state under the root is skipped, as MaxText's own
# `extract_nnx_weights` skips it.

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


class ParamTree:
    """The MaxText params among an item dir's array keys (tuples of path parts): root, layers, family."""

    def __init__(self, path: str, keys: set[tuple[str, ...]]):
        self.path = path
        self.keys = keys
        self.root, self.wrap = self._find_root()
        self.layout = {("params", "params"): "linen", ("params",): "linen", (): "nnx", ("base",): "tunix"}[self.root]
        self.scanned = self.key("query", 0, scanned=True) in self.keys
        self._layer_path = None
        if self.scanned:
            self.num_layers = None  # from the shape of a stacked leaf (orbax_reader.Checkpoint)
        else:
            self.num_layers = self._find_unscanned_layers()
        self.family = "llama"
        if self.key("query_norm", 0) in self.keys:
            self.family = "qwen3_moe" if self.key("moe_gate", 0) in self.keys else "qwen3"
        self.layer_leaves = FAMILY_LAYER_LEAVES[self.family]
        self.tied = self.key("logits") not in self.keys

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

    def key(self, name: str, layer: int | None = None, scanned: bool | None = None) -> tuple[str, ...]:
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
        return "/".join(self.key(name, layer))

    def layer_ids(self) -> list[int | None]:
        """[None] for a scanned checkpoint (one stacked array per leaf), else 0..L-1."""
        return [None] if self.scanned else list(range(self.num_layers))

    def wanted(self) -> list[tuple[str, ...]]:
        """Every key the Llama mapping reads."""
        keys = [self.key(n) for n in GLOBAL_LEAVES if not (n == "logits" and self.tied)]
        for layer in self.layer_ids():
            keys += [self.key(n, layer) for n in self.layer_leaves]
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

"""MaxText-shaped Orbax checkpoints for the converter tests, written the way MaxText writes them.

    python -m tests.convert_fixtures OUT_DIR SPECS_JSON

runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (so arrays are
sharded over a 4x2 mesh, like a multi-device MaxText save) and writes, per spec:
    OUT_DIR/<name>/<step>/<item>    the checkpoint (CheckpointManager, ocdbt + zarr3 unless zarr2)
    OUT_DIR/<name>.npz              the same params (ground truth, float32 of the stored values)
The pytest process itself never imports jax.

Layouts (spec "kind"), after MaxText's own writers (see converters/orbax_reader.py):
    train    Linen train state: params/params + opt_state + step + iter + nnx_aux (+ teacher_params)
    params   Linen params-only: params/params + empty opt_state + step 0
    nnx      NNX param-only (pure_nnx): the model at the root, every leaf {"value": x}
    tunix    Tunix SFT: item dir model_params, model under base/, {"value": x}, plus rngs state
Other spec keys: scanned, dtype, zarr2 (use_zarr3=False and no use_zarr3 in _METADATA: an older
orbax), tied (no logits_dense), layers_list (unscanned as decoder/layers/{i}), extra (leaves
to add under the model root), drop, teacher, sharded, params_npz (params instead of random).

`train_tiny_llama` trains a tiny HF-layout Llama with torch on CPU for the convention tests, and
`to_maxtext` writes its weights in MaxText's parameterisation for a given convention.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np

LAYER = ("query", "key", "value", "out", "wi_0", "wi_1", "wo", "pre_norm", "post_norm")
MODULE = {"query": ("self_attention", "query", "kernel"), "key": ("self_attention", "key", "kernel"),
          "value": ("self_attention", "value", "kernel"), "out": ("self_attention", "out", "kernel"),
          "wi_0": ("mlp", "wi_0", "kernel"), "wi_1": ("mlp", "wi_1", "kernel"), "wo": ("mlp", "wo", "kernel"),
          "pre_norm": ("pre_self_attention_layer_norm", "scale"),
          "post_norm": ("post_self_attention_layer_norm", "scale"),
          "query_norm": ("self_attention", "query_norm", "scale"), "key_norm": ("self_attention", "key_norm", "scale"),
          "moe_gate": ("moe_block", "gate", "kernel"), "moe_wi_0": ("moe_block", "wi_0"),
          "moe_wi_1": ("moe_block", "wi_1"), "moe_wo": ("moe_block", "wo")}
MOE = ("moe_gate", "moe_wi_0", "moe_wi_1", "moe_wo")  # Qwen3 MoE (dims "family": "qwen3_moe", "experts": X)
QK_NORMS = ("query_norm", "key_norm")  # Qwen3 (dims "family": "qwen3")


def layer_names(p: dict) -> tuple:
    """The per-layer leaves present in params p (Llama, or Qwen3 with q/k norms)."""
    return tuple(n for n in MODULE if n in p)


def layer_shapes(d: dict) -> dict:
    e, h, k, hd, m = d["emb"], d["heads"], d["kv_heads"], d["head_dim"], d["mlp"]
    shapes = {"query": (e, h, hd), "key": (e, k, hd), "value": (e, k, hd), "out": (h, hd, e),
              "wi_0": (e, m), "wi_1": (e, m), "wo": (m, e), "pre_norm": (e,), "post_norm": (e,)}
    if d.get("family") in ("qwen3", "qwen3_moe"):
        shapes.update(query_norm=(hd,), key_norm=(hd,))
    if d.get("family") == "qwen3_moe":
        x = d["experts"]
        for n in ("wi_0", "wi_1", "wo"):
            del shapes[n]
        shapes.update(moe_gate=(e, x), moe_wi_0=(x, e, m), moe_wi_1=(x, e, m), moe_wo=(x, m, e))
    return shapes


def make_params(d: dict, seed: int) -> dict:
    """Random params in MaxText layout, stacked per leaf as [L, ...] (callers move the axis)."""
    rng = np.random.default_rng(seed)
    e = d["emb"]
    std = lambda fan_in: 1.0 / np.sqrt(fan_in)  # noqa: E731
    p = {"embedding": rng.normal(0, 1.0, (d["vocab"], e)),
         "final_norm": 1 + 0.1 * rng.standard_normal(e),
         "logits": rng.normal(0, 2 * std(e), (e, d["vocab"]))}
    fan = {"query": e, "key": e, "value": e, "out": d["heads"] * d["head_dim"], "wi_0": e, "wi_1": e,
           "wo": d["mlp"], "moe_gate": e / 16, "moe_wi_0": e, "moe_wi_1": e, "moe_wo": d["mlp"]}  # sharp routing
    for n, s in layer_shapes(d).items():
        shape = (d["layers"],) + s
        if n.endswith("norm"):
            p[n] = 1 + 0.1 * rng.standard_normal(shape)
        else:  # larger than default init so that greedy outputs depend on the prompt; a small
            # query keeps the folded (x sqrt(D)) attention logits moderate
            p[n] = rng.normal(0, (0.5 if n == "query" else 1.5) * std(fan[n]), shape)
    return {k: v.astype(np.float32) for k, v in p.items()}


def maxtext_tree(p: dict, scanned: bool, tied: bool = False, layers_list: bool = False) -> dict:
    """The MaxText param tree {token_embedder, decoder} from make_params output."""
    def leaf(layers_dict, n, a):
        node = layers_dict
        for k in MODULE[n][:-1]:
            node = node.setdefault(k, {})
        node[MODULE[n][-1]] = a

    dec = {"decoder_norm": {"scale": p["final_norm"]}}
    if not tied:
        dec["logits_dense"] = {"kernel": p["logits"]}
    L = p["query"].shape[0]
    if scanned:
        dec["layers"] = {}
        for n in layer_names(p):
            leaf(dec["layers"], n, np.moveaxis(p[n], 0, 1))  # layer axis at 1
    else:
        where = dec.setdefault("layers", {}) if layers_list else dec
        for i in range(L):
            layer = where.setdefault(str(i) if layers_list else f"layers_{i}", {})
            for n in layer_names(p):
                leaf(layer, n, p[n][i])
    return {"token_embedder": {"embedding": p["embedding"]}, "decoder": dec}


def _wrap_value(node):
    """{"value": x} around every leaf, as MaxText's _save_decode_checkpoint_nnx writes NNX params."""
    return {k: _wrap_value(v) for k, v in node.items()} if isinstance(node, dict) else {"value": node}


def _save(out_dir: str, spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    d = spec["dims"]
    if spec.get("params_npz"):
        with np.load(spec["params_npz"]) as z:
            p = {k: z[k].astype(np.float32) for k in z.files}
    else:
        p = make_params(d, spec.get("seed", 0))
    dtype = spec.get("dtype", "float32")
    if dtype == "bfloat16":
        p = {k: v.astype(ml_dtypes.bfloat16) for k, v in p.items()}
    tied = spec.get("tied", False)
    if tied:
        p.pop("logits", None)
    np.savez(os.path.join(out_dir, spec["name"] + ".npz"), **{k: v.astype(np.float32) for k, v in p.items()})
    tree = maxtext_tree(p, spec["scanned"], tied=tied, layers_list=spec.get("layers_list", False))
    for path, shape in spec.get("extra", []):  # e.g. a Qwen3 query_norm: leaves no Llama has
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.ones(shape, np.asarray(p["embedding"]).dtype)
    if spec.get("drop"):  # a leaf to leave out, as a key path under the model root
        node = tree
        for k in spec["drop"][:-1]:
            node = node[k]
        del node[spec["drop"][-1]]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))

    def put(a):  # numpy straight to the devices: no jnp op, so no XLA compile per shape (most of a save)
        a = np.asarray(a)
        if not spec.get("sharded", True):
            return jax.device_put(a, jax.devices()[0])
        axes = [None] * a.ndim
        if a.shape[0] % 4 == 0:
            axes[0] = "fsdp"
        if a.ndim > 1 and a.shape[-1] % 2 == 0:
            axes[-1] = "tp"
        return jax.device_put(a, NamedSharding(mesh, P(*axes)))

    kind = spec.get("kind", "train")
    item = "items"
    step = 0
    if kind in ("train", "params"):
        params = {"params": jax.tree.map(put, tree)}
        if spec.get("teacher"):  # a teacher of another shape: reading it would break the conversion
            td = dict(d, emb=d["emb"] // 2, layers=1, mlp=d["mlp"] // 2)
            params["teacher_params"] = jax.tree.map(put, maxtext_tree(make_params(td, 99), spec["scanned"]))
        if kind == "train":
            zeros = lambda: jax.tree.map(lambda a: put(np.zeros_like(np.asarray(a))), tree)  # noqa: E731
            state = {"params": params, "step": jnp.int32(7),
                     "opt_state": [{"count": jnp.int32(7), "mu": zeros(), "nu": zeros()}, {}],
                     "iter": {"epoch": jnp.int32(1)},  # unknown top-level keys are ignored
                     "nnx_aux": {"rngs": {"dropout": {"count": jnp.uint32(3)}}}}
            step = 7
        else:  # params-only, as MaxText's Linen generate_param_only_checkpoint writes it
            state = {"params": params, "opt_state": {}, "step": jnp.int32(0)}
    elif kind == "nnx":  # MaxText's default param-only checkpoint (pure_nnx)
        state = _wrap_value(jax.tree.map(put, tree))
    elif kind == "tunix":  # nnx.state(model) of Tunix's MaxText adapter: base/ + rng state
        state = {"base": _wrap_value(jax.tree.map(put, tree))}
        state["base"]["rngs"] = {"params": {"count": {"value": jnp.uint32(5)},
                                            "key": {"value": jnp.zeros((2,), jnp.uint32)}}}
        item = "model_params"
        step = 3
    else:
        raise ValueError(kind)
    root = os.path.abspath(os.path.join(out_dir, spec["name"]))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=not spec.get("zarr2"))
    mgr = ocp.CheckpointManager(root, item_names=(item,), item_handlers={item: handler})
    mgr.save(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeSave(state)}))
    mgr.wait_until_finished()
    mgr.close()
    if spec.get("zarr2"):  # an older orbax: no use_zarr3 field at all (orbax then reads zarr v2)
        meta_path = os.path.join(root, str(step), item, "_METADATA")
        meta = json.load(open(meta_path))
        meta.pop("use_zarr3", None)
        json.dump(meta, open(meta_path, "w"))


def items_path(out_dir: str, spec: dict) -> str:
    kind = spec.get("kind", "train")
    step = {"train": 7, "tunix": 3}.get(kind, 0)
    return os.path.join(out_dir, spec["name"], str(step), "model_params" if kind == "tunix" else "items")


def build(out_dir: str, specs: list[dict], timeout: float = 600) -> dict[str, str]:
    """Write all specs in one 8-device subprocess; returns name -> items path."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "tests.convert_fixtures", out_dir, json.dumps(specs)], env=env,
                   cwd=repo, check=True, timeout=timeout)
    return {s["name"]: items_path(out_dir, s) for s in specs}


def load_truth(out_dir: str, name: str) -> dict:
    with np.load(os.path.join(out_dir, name + ".npz")) as z:
        return {k: z[k] for k in z.files}


def truth_as_reference(p: dict, scanned_like: bool = False) -> dict:
    """make_params output -> converters.reference.forward's param dict."""
    return {"embedding": p["embedding"], "final_norm": p["final_norm"], "logits": p.get("logits"),
            "layers": [{n: p[n][i] for n in layer_names(p)} for i in range(p["query"].shape[0])]}


# --- a tiny Llama trained on the spot ----------------------------------------------------------
#
# Telling the conventions apart needs a model whose loss depends on them (shared/FACTS.md): a
# copy task (the row repeats itself: attention must find the position one period back, so the
# rotary layout matters; a softer attention blurs it) mixed with a "topic" task (a row draws
# i.i.d. from its own 6 tokens: prediction averages the context, which a sharper attention
# spoils). A copy-only model cannot tell a folded query scale apart.

TINY = dict(vocab=64, emb=64, layers=2, heads=4, kv_heads=2, head_dim=32, mlp=128)
TINY_T = 128
SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def word(i: int) -> str:
    return f"t{i:02d}"


def make_word_tokenizer(out_dir: str) -> str:
    """A whitespace word-level tokenizer over TINY's vocab: the probe text is words t04..t63."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({word(i): i for i in range(len(SPECIALS), TINY["vocab"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end_of_text|>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def task_rows(rng: np.random.Generator, n: int, T: int = TINY_T) -> np.ndarray:
    """Even rows: copy (a random half-length run, repeated) then topic; odd rows: topic only."""
    lo, V = len(SPECIALS), TINY["vocab"]
    out = np.empty((n, T), np.int64)
    for i in range(n):
        topic = rng.choice(np.arange(lo, V), 6, replace=False)
        if i % 2:
            out[i] = rng.choice(topic, T)
        else:
            a = rng.integers(lo, V, T // 4)
            out[i] = np.concatenate([a, a, rng.choice(topic, T // 2)])
    return out


def probe_text(seed: int = 123, n: int = 12) -> str:
    """Rows as blank-line separated documents (each is scored as its own sequence)."""
    return "\n\n".join(" ".join(word(t) for t in row) for row in task_rows(np.random.default_rng(seed), n)) + "\n"


def train_tiny_llama(steps: int = 300, seed: int = 0, theta: float = 500000.0, qk_norm: bool = False,
                     experts: int = 0, top_k: int = 2) -> dict:
    """HF-layout weights (numpy) of TINY trained with torch on CPU: half-split RoPE, attention
    scaled by 1/sqrt(head_dim), as transformers' LlamaForCausalLM computes. The head is tied the
    way MaxText's logits_via_embedding with normalize_embedding_logits is: logits = x @ emb.T /
    sqrt(E), so the same weights can be written tied or untied (`to_maxtext`). experts > 0: the MLP
    is a Qwen3 MoE block (HF names mlp.gate / mlp.experts.{j}.*): top_k of the router logits, a
    softmax over those k (MaxText's moe.py get_topk; HF's norm_topk_prob true is the same)."""
    import torch

    d = TINY
    V, E, L, H, K, D, M = (d[k] for k in ("vocab", "emb", "layers", "heads", "kv_heads", "head_dim", "mlp"))
    T = TINY_T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        P = lambda *s, std: torch.nn.Parameter(torch.randn(*s, generator=g) * std)  # noqa: E731
        ones = lambda: torch.nn.Parameter(torch.ones(E))  # noqa: E731
        p = {"model.embed_tokens.weight": P(V, E, std=1.0), "model.norm.weight": ones()}
        for i in range(L):
            pre = f"model.layers.{i}."
            p.update({pre + "input_layernorm.weight": ones(), pre + "post_attention_layernorm.weight": ones(),
                      pre + "self_attn.q_proj.weight": P(H * D, E, std=E ** -0.5),
                      pre + "self_attn.k_proj.weight": P(K * D, E, std=E ** -0.5),
                      pre + "self_attn.v_proj.weight": P(K * D, E, std=E ** -0.5),
                      pre + "self_attn.o_proj.weight": P(E, H * D, std=(H * D) ** -0.5),
                      })
            mlps = [f"mlp.experts.{j}." for j in range(experts)] if experts else ["mlp."]
            if experts:
                p[pre + "mlp.gate.weight"] = P(experts, E, std=E ** -0.5)
            for m in mlps:
                p.update({pre + m + "gate_proj.weight": P(M, E, std=E ** -0.5),
                          pre + m + "up_proj.weight": P(M, E, std=E ** -0.5),
                          pre + m + "down_proj.weight": P(E, M, std=M ** -0.5)})
            if qk_norm:  # Qwen3: RMSNorm of each q/k head before RoPE
                p.update({pre + "self_attn.q_norm.weight": torch.nn.Parameter(torch.ones(D)),
                          pre + "self_attn.k_norm.weight": torch.nn.Parameter(torch.ones(D))})
        inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
        rms = lambda x, w: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731

        def rope(x):  # [B, heads, T, D], half-split
            a, b = x[..., : D // 2], x[..., D // 2:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

        def forward(tok):
            B = tok.shape[0]
            x = p["model.embed_tokens.weight"][tok]
            for i in range(L):
                w = lambda n: p[f"model.layers.{i}.{n}.weight"]  # noqa: E731
                h = rms(x, w("input_layernorm"))
                q = (h @ w("self_attn.q_proj").T).view(B, T, H, D).transpose(1, 2)
                k = (h @ w("self_attn.k_proj").T).view(B, T, K, D).transpose(1, 2)
                v = (h @ w("self_attn.v_proj").T).view(B, T, K, D).transpose(1, 2)
                if qk_norm:
                    q, k = rms(q, w("self_attn.q_norm")), rms(k, w("self_attn.k_norm"))
                q, k = rope(q), rope(k)
                k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + o.transpose(1, 2).reshape(B, T, H * D) @ w("self_attn.o_proj").T
                h = rms(x, w("post_attention_layernorm"))
                mlp = lambda m: (torch.nn.functional.silu(h @ w(m + "gate_proj").T) * (  # noqa: E731
                    h @ w(m + "up_proj").T)) @ w(m + "down_proj").T
                if not experts:
                    x = x + mlp("mlp.")
                    continue
                top, idx = torch.topk(h @ w("mlp.gate").T, top_k, dim=-1)
                gates = torch.zeros(B, T, experts).scatter(-1, idx, torch.softmax(top, -1))
                x = x + sum(gates[..., j:j + 1] * mlp(f"mlp.experts.{j}.") for j in range(experts))
            return rms(x, p["model.norm.weight"]) @ p["model.embed_tokens.weight"].T / math.sqrt(E)

        opt = torch.optim.Adam(p.values(), lr=1e-2)
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            tok = torch.from_numpy(task_rows(rng, 16))
            logits = forward(tok)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), tok[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach().numpy().astype(np.float32) for k, v in p.items()}
    finally:
        torch.set_num_threads(threads)


def interleave(x: np.ndarray) -> np.ndarray:
    """Half-split pairs (i, i + D/2) on the last axis -> MaxText llama3.1's interleaved (2i, 2i+1)."""
    y = np.empty_like(x)
    half = x.shape[-1] // 2
    y[..., 0::2], y[..., 1::2] = x[..., :half], x[..., half:]
    return y


def to_maxtext(hf: dict, query_scale: str, rope_layout: str, tied: bool = False, d: dict = TINY,
               normalize: bool = True) -> dict:
    """train_tiny_llama's weights -> make_params-format MaxText params for a convention (the inverse
    of the converter, written independently: MaxText's fold puts 1/sqrt(D) into the query kernel
    and computes q.k unscaled; interleaved layouts rotate pairs (2i, 2i+1)). Untied: a
    logits_dense kernel computing what the tied head computes in MaxText, bf16(emb).T / sqrt(E)."""
    E, L, H, K, D = d["emb"], d["layers"], d["heads"], d["kv_heads"], d["head_dim"]
    per = {n: [] for n in LAYER}
    for i in range(L):
        w = lambda n: hf[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        q = w("self_attn.q_proj").T.reshape(E, H, D)
        k = w("self_attn.k_proj").T.reshape(E, K, D)
        if rope_layout == "interleaved":
            q, k = interleave(q), interleave(k)
        if query_scale == "fold":
            q = q / np.float32(math.sqrt(D))
        per["query"].append(q)
        per["key"].append(k)
        per["value"].append(w("self_attn.v_proj").T.reshape(E, K, D))
        per["out"].append(w("self_attn.o_proj").T.reshape(H, D, E))
        if f"model.layers.{i}.mlp.gate.weight" in hf:  # Qwen3 MoE: experts stacked on axis 0
            x = w("mlp.gate").shape[0]
            ex = lambda n: np.stack([w(f"mlp.experts.{j}.{n}").T for j in range(x)])  # noqa: E731
            for n, v in (("moe_gate", w("mlp.gate").T), ("moe_wi_0", ex("gate_proj")), ("moe_wi_1", ex("up_proj")),
                         ("moe_wo", ex("down_proj"))):
                per.setdefault(n, []).append(v)
        else:
            per["wi_0"].append(w("mlp.gate_proj").T)
            per["wi_1"].append(w("mlp.up_proj").T)
            per["wo"].append(w("mlp.down_proj").T)
        per["pre_norm"].append(w("input_layernorm"))
        per["post_norm"].append(w("post_attention_layernorm"))
        if f"model.layers.{i}.self_attn.q_norm.weight" in hf:  # Qwen3: the norm scales follow q/k's layout
            for n, hn in (("query_norm", "self_attn.q_norm"), ("key_norm", "self_attn.k_norm")):
                per.setdefault(n, []).append(interleave(w(hn)) if rope_layout == "interleaved" else w(hn))
    p = {n: np.stack(v).astype(np.float32) for n, v in per.items() if v}
    emb = hf["model.embed_tokens.weight"]
    p.update(embedding=emb, final_norm=hf["model.norm.weight"])
    if not tied:
        import ml_dtypes

        head = emb.astype(ml_dtypes.bfloat16).astype(np.float32) / np.float32(math.sqrt(E))
        p["logits"] = np.ascontiguousarray(head.T)
    elif not normalize:  # normalize_embedding_logits false: the 1/sqrt(E) moves into the final norm
        p["final_norm"] = (p["final_norm"] / np.float32(math.sqrt(E))).astype(np.float32)
    return p


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    for s in json.loads(sys.argv[2]):
        _save(sys.argv[1], s)

"""MaxText-shaped Orbax checkpoints for the converter tests, written the way MaxText writes them.

    python -m tests.convert_fixtures OUT_DIR SPECS_JSON

runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (so arrays are
sharded over a 4x2 mesh, like a multi-device MaxText save) and writes, per spec:
    OUT_DIR/<name>/<step>/items      the checkpoint (CheckpointManager, ocdbt + zarr3)
    OUT_DIR/<name>.npz               the same params (ground truth, float32 of the stored values)
The pytest process itself never imports jax.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

LAYER = ("query", "key", "value", "out", "wi_0", "wi_1", "wo", "pre_norm", "post_norm")


def layer_shapes(d: dict) -> dict:
    e, h, k, hd, m = d["emb"], d["heads"], d["kv_heads"], d["head_dim"], d["mlp"]
    return {"query": (e, h, hd), "key": (e, k, hd), "value": (e, k, hd), "out": (h, hd, e),
            "wi_0": (e, m), "wi_1": (e, m), "wo": (m, e), "pre_norm": (e,), "post_norm": (e,)}


def make_params(d: dict, seed: int) -> dict:
    """Random params in MaxText layout, stacked per leaf as [L, ...] (callers move the axis)."""
    rng = np.random.default_rng(seed)
    e = d["emb"]
    std = lambda fan_in: 1.0 / np.sqrt(fan_in)  # noqa: E731
    p = {"embedding": rng.normal(0, 1.0, (d["vocab"], e)),
         "final_norm": 1 + 0.1 * rng.standard_normal(e),
         "logits": rng.normal(0, 2 * std(e), (e, d["vocab"]))}
    fan = {"query": e, "key": e, "value": e, "out": d["heads"] * d["head_dim"], "wi_0": e, "wi_1": e,
           "wo": d["mlp"]}
    for n, s in layer_shapes(d).items():
        shape = (d["layers"],) + s
        if n.endswith("norm"):
            p[n] = 1 + 0.1 * rng.standard_normal(shape)
        else:  # larger than default init so that greedy outputs depend on the prompt; a small
            # query keeps the folded (x sqrt(D)) attention logits moderate
            p[n] = rng.normal(0, (0.5 if n == "query" else 1.5) * std(fan[n]), shape)
    return {k: v.astype(np.float32) for k, v in p.items()}


def maxtext_tree(p: dict, scanned: bool) -> dict:
    """The MaxText param tree {token_embedder, decoder} from make_params output."""
    def leaf(layers_dict, n, a):
        mod = {"query": ("self_attention", "query", "kernel"), "key": ("self_attention", "key", "kernel"),
               "value": ("self_attention", "value", "kernel"), "out": ("self_attention", "out", "kernel"),
               "wi_0": ("mlp", "wi_0", "kernel"), "wi_1": ("mlp", "wi_1", "kernel"),
               "wo": ("mlp", "wo", "kernel"), "pre_norm": ("pre_self_attention_layer_norm", "scale"),
               "post_norm": ("post_self_attention_layer_norm", "scale")}[n]
        node = layers_dict
        for k in mod[:-1]:
            node = node.setdefault(k, {})
        node[mod[-1]] = a

    dec = {"decoder_norm": {"scale": p["final_norm"]}, "logits_dense": {"kernel": p["logits"]}}
    L = p["query"].shape[0]
    if scanned:
        dec["layers"] = {}
        for n in LAYER:
            leaf(dec["layers"], n, np.moveaxis(p[n], 0, 1))  # layer axis at 1
    else:
        for i in range(L):
            dec[f"layers_{i}"] = {}
            for n in LAYER:
                leaf(dec[f"layers_{i}"], n, p[n][i])
    return {"token_embedder": {"embedding": p["embedding"]}, "decoder": dec}


def _save(out_dir: str, spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    d = spec["dims"]
    p = make_params(d, spec.get("seed", 0))
    dtype = spec.get("dtype", "float32")
    if dtype == "bfloat16":
        p = {k: v.astype(ml_dtypes.bfloat16) for k, v in p.items()}
    np.savez(os.path.join(out_dir, spec["name"] + ".npz"), **{k: v.astype(np.float32) for k, v in p.items()})
    tree = maxtext_tree(p, spec["scanned"])
    if spec.get("drop"):  # a leaf to leave out, as a key path under the model root
        node = tree
        for k in spec["drop"][:-1]:
            node = node[k]
        del node[spec["drop"][-1]]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))

    def put(a):
        a = np.asarray(a)
        if not spec.get("sharded", True):
            return jax.device_put(jnp.asarray(a), jax.devices()[0])
        axes = [None] * a.ndim
        if a.shape[0] % 4 == 0:
            axes[0] = "fsdp"
        if a.ndim > 1 and a.shape[-1] % 2 == 0:
            axes[-1] = "tp"
        return jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(*axes)))

    params = {"params": jax.tree.map(put, tree)}
    if spec.get("teacher"):  # a teacher of another shape: reading it would break the conversion
        td = dict(d, emb=d["emb"] // 2, layers=1, mlp=d["mlp"] // 2)
        params["teacher_params"] = jax.tree.map(put, maxtext_tree(make_params(td, 99), spec["scanned"]))
    if spec.get("kind", "train") == "train":
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
        state = {"params": params, "step": jnp.int32(7),
                 "opt_state": [{"count": jnp.int32(7), "mu": zeros(params["params"]),
                                "nu": zeros(params["params"])}, {}],
                 "iter": {"epoch": jnp.int32(1)}}  # unknown top-level keys are ignored
        step = 7
    else:  # params-only, as MaxText's generate_param_only_checkpoint writes it
        state = {"params": params, "opt_state": {}, "step": jnp.int32(0)}
        step = 0
    root = os.path.abspath(os.path.join(out_dir, spec["name"]))
    mgr = ocp.CheckpointManager(root, item_names=("items",),
                                item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
    mgr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)))
    mgr.wait_until_finished()
    mgr.close()


def items_path(out_dir: str, spec: dict) -> str:
    step = 7 if spec.get("kind", "train") == "train" else 0
    return os.path.join(out_dir, spec["name"], str(step), "items")


def build(out_dir: str, specs: list[dict], timeout: float = 300) -> dict[str, str]:
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
    return {"embedding": p["embedding"], "final_norm": p["final_norm"], "logits": p["logits"],
            "layers": [{n: p[n][i] for n in LAYER} for i in range(p["query"].shape[0])]}


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    for s in json.loads(sys.argv[2]):
        _save(sys.argv[1], s)

#!/usr/bin/env python
"""Peak memory of converting a Qwen3 MoE checkpoint: stacked expert kernels streamed block by block.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_convert_moe.py [--layers 2] [--experts 128]
        [--emb 2048] [--moe-mlp 768] [--fsdp 8] [--workdir /tmp/kdgen-bench-moe] [--keep]

1. Synthesizes (once; reused while --workdir keeps it) a bf16 params-only scanned Qwen3 MoE
   checkpoint with qwen3-30b-a3b's per-layer shapes (128 experts, E 2048, moe_mlp 768, 32 q heads,
   4 kv heads, head_dim 128) and few layers, saved like MaxText (CheckpointManager, ocdbt + zarr3)
   over --fsdp host devices along the embed axis, as MaxText's default fsdp sharding does for
   expert kernels ("exp" -> the expert mesh axis of size 1, "embed_no_exp" -> fsdp): each stored
   chunk of wi_0 is [X, L, E / fsdp, M], every expert and every layer, unless that shard is larger
   than --chunk-byte-size: MaxText saves with SaveArgs(chunk_byte_size) and
   ocdbt_target_data_file_size both = checkpoint_storage_target_data_file_size_bytes (2 GiB in
   base.yml; common/checkpointing.py), and orbax then splits the shard's largest sharded axis
   (orbax arrays/subchunking.py choose_chunk_shape) until a chunk fits.
2. Converts it in a child process (`python -m converters.cli convert`, bf16 out) and reads the
   child's peak RSS from wait4(); spot-checks one expert tensor against the synthetic truth.
The target (issue 24): peak RSS < 1.5 x the largest per-layer expert block + 1 GiB, where the block
is one layer of one stacked expert kernel (X x E x M x 2 bytes: 384 MiB at qwen3-30b-a3b's shapes).
Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GIB = 1 << 30


def leaf(name: str, shape: tuple[int, ...]):
    """Deterministic pseudo-random bf16 leaf (the same in every process)."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(math.prod(shape), dtype=np.float32) * np.float32(0.02)).astype(
        ml_dtypes.bfloat16).reshape(shape)


def shapes(a) -> dict:
    e, L, x, m, h, k, d, v = a.emb, a.layers, a.experts, a.moe_mlp, 32, 4, 128, 512
    return {  # MaxText param paths under params/params (scanned: layer axis 1)
        "token_embedder/embedding": (v, e), "decoder/decoder_norm/scale": (e,), "decoder/logits_dense/kernel": (e, v),
        "decoder/layers/self_attention/query/kernel": (e, L, h, d),
        "decoder/layers/self_attention/key/kernel": (e, L, k, d),
        "decoder/layers/self_attention/value/kernel": (e, L, k, d),
        "decoder/layers/self_attention/out/kernel": (h, L, d, e),
        "decoder/layers/self_attention/query_norm/scale": (d, L),
        "decoder/layers/self_attention/key_norm/scale": (d, L),
        "decoder/layers/pre_self_attention_layer_norm/scale": (e, L),
        "decoder/layers/post_self_attention_layer_norm/scale": (e, L),
        "decoder/layers/moe_block/gate/kernel": (e, L, x),
        "decoder/layers/moe_block/wi_0": (x, L, e, m), "decoder/layers/moe_block/wi_1": (x, L, e, m),
        "decoder/layers/moe_block/wo": (x, L, m, e),
    }


def synth(root: str, a) -> None:
    """In a child with --fsdp host devices: write the checkpoint."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    tree: dict = {}
    for path, shape in shapes(a).items():
        embed_axis = {"moe_block/wi_0": 2, "moe_block/wi_1": 2, "moe_block/wo": 3}.get(path.split("layers/")[-1], 0)
        spec = [None] * len(shape)
        if shape[embed_axis] % a.fsdp == 0 and len(shape) > 1:
            spec[embed_axis] = "fsdp"
        node = tree
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jax.device_put(jnp.asarray(leaf(path, shape)), NamedSharding(mesh, P(*spec)))
    state = {"params": {"params": tree}, "opt_state": {}, "step": jnp.int32(0)}
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=a.chunk_byte_size), state)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
    mgr = ocp.CheckpointManager(root, item_names=("items",), item_handlers={"items": handler})
    mgr.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave(
        state, save_args=save_args, ocdbt_target_data_file_size=a.chunk_byte_size)))
    mgr.wait_until_finished()
    mgr.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--emb", type=int, default=2048)
    ap.add_argument("--moe-mlp", type=int, default=768)
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--chunk-byte-size", type=int, default=2 << 30,
                    help="as MaxText's checkpoint_storage_target_data_file_size_bytes (base.yml default 2 GiB)")
    ap.add_argument("--workdir", default="/tmp/kdgen-bench-moe")
    ap.add_argument("--keep", action="store_true", help="keep the converted model dir")
    ap.add_argument("--synth", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.synth:
        synth(a.synth, a)
        return 0
    tag = f"L{a.layers}-X{a.experts}-E{a.emb}-M{a.moe_mlp}-fsdp{a.fsdp}" + (
        f"-cb{a.chunk_byte_size}" if a.chunk_byte_size != 2 << 30 else "")
    root = os.path.join(a.workdir, tag)
    items = os.path.join(root, "0", "items")
    if not os.path.exists(os.path.join(items, "_METADATA")):
        shutil.rmtree(root, ignore_errors=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={a.fsdp}")
        t = time.monotonic()
        subprocess.run([sys.executable, __file__, "--synth", root, "--layers", str(a.layers), "--experts",
                        str(a.experts), "--emb", str(a.emb), "--moe-mlp", str(a.moe_mlp), "--fsdp", str(a.fsdp),
                        "--chunk-byte-size", str(a.chunk_byte_size)],
                       env=env, check=True)
        print(f"synthesized {root} in {time.monotonic() - t:.0f}s", flush=True)
    from kdgen import tiny

    tok = tiny.make_tokenizer(os.path.join(a.workdir, "tok"))
    out = os.path.join(a.workdir, "hf-" + tag)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "converters.cli", "convert", "--checkpoint", items, "--out", out, "--tokenizer", tok,
           "--experts-per-token", "8", "--dtype", "bfloat16"]
    t = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    stdout, stderr = p.stdout.read(), p.stderr.read()
    if status:
        print(stderr[-2000:], file=sys.stderr)
        return 1
    rss = ru.ru_maxrss * 1024
    block = a.experts * a.emb * a.moe_mlp * 2  # one layer of one stacked expert kernel, bf16
    target = 1.5 * block + GIB
    import numpy as np
    from safetensors import safe_open

    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    name = f"model.layers.{a.layers - 1}.mlp.experts.{a.experts - 1}.down_proj.weight"
    with safe_open(os.path.join(out, idx[name]), framework="pt") as f:
        got = f.get_tensor(name).view(dtype=__import__("torch").int16).numpy().view(np.uint16)
    want = leaf("decoder/layers/moe_block/wo", shapes(a)["decoder/layers/moe_block/wo"])[a.experts - 1, a.layers - 1].T
    ok = bool(np.array_equal(got, want.view(np.uint16)))
    from converters.orbax_reader import Checkpoint

    chunk = tuple(Checkpoint(items).store("moe_wi_0").chunk_layout.read_chunk.shape)  # the stored chunk of wi_0
    cpu = ru.ru_utime + ru.ru_stime  # the child's CPU seconds: comparable on a loaded box, unlike wall time
    res = {"shape": tag, "seconds": round(secs, 1), "cpu_seconds": round(cpu, 1), "peak_rss_bytes": rss,
           "largest_expert_block_bytes": block,
           "wi_0_chunk": chunk, "wi_0_chunk_bytes": math.prod(chunk) * 2,
           "target_bytes": int(target), "rss_under_target": rss < target, "spot_check": ok,
           "bytes_in": sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(items) for f in fs)}
    print(f"peak RSS {rss / 2**20:.0f} MiB; wi_0 stored chunk {list(chunk)} = {math.prod(chunk) / 2**19:.0f} MiB; "
          f"largest per-layer expert block {block / 2**20:.0f} MiB; target "
          f"{target / 2**20:.0f} MiB: {'ok' if rss < target else 'OVER'}; {secs:.1f}s ({cpu:.1f} s CPU); spot check "
          f"{'ok' if ok else 'WRONG'}")
    print(json.dumps(res))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if rss < target and ok else 1


if __name__ == "__main__":
    sys.exit(main())

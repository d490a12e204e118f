#!/usr/bin/env python
"""Converter benchmark: a synthetic MaxText checkpoint of >= 2 GB, converted with bounded memory.

    JAX_PLATFORMS=cpu /work/bin/slot .venv/bin/python bench/bench_convert.py [--size llama3.1-05b]
        [--dtype bfloat16] [--workdir /tmp/kdgen-bench-convert] [--block-mb 64] [--fsdp 8] [--rounds 3]
        [--baseline-tree DIR] [--keep] [--warm-cp] [-- EXTRA CONVERT FLAGS]

1. Synthesizes (once; reused while --workdir keeps it) a params-only float32 scanned checkpoint of
   the named size with random weights, saved like MaxText: CheckpointManager, ocdbt + zarr3, the
   arrays sharded over --fsdp host devices along the embed axis (so the stored chunks span
   every layer: the layout where per-layer slicing re-reads whole chunks).
2. Rounds, interleaved: a plain `cp -r` of the item dir (the same bytes: the I/O baseline), then
   the conversion in a child process (`python -m converters.cli convert`), whose peak RSS comes
   from wait4(). Each round gives one convert/cp ratio; the medians are reported (the machine
   is shared and noisy). With --baseline-tree (another checkout, e.g. `git archive` of an older
   commit) each round also converts with that tree's converter: before/after under the same load.
   Spot-checks some converted tensors against the synthetic truth.
   --warm-cp: each timed cp and each baseline conversion is preceded by an untimed `cp -r` that is
   removed again, so every timed run starts just after 2.55 GB of page cache was freed. On the
   dev VM freed guest pages are handed back to the host after a moment (virtio-balloon free page
   reporting) and the next run to take fresh pages pays ~1-2 ns/byte for them: without this,
   whichever run follows another one's exit by a few seconds is the slow one (cp -r 0.6 s vs
   5.8 s of CPU; a converter run second of two ~0.3 s slower).
Prints one line per round and per figure and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 1 << 30


def leaf_array(name: str, shape: tuple[int, ...], seed: int = 0):
    """Deterministic pseudo-random float32 leaf (same in every process)."""
    import numpy as np

    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    flat = rng.standard_normal(math.prod(shape), dtype=np.float32) * np.float32(0.02)
    return flat.reshape(shape)


def synth(out: str, size: str, fsdp: int) -> None:
    """Runs in a child with fsdp host devices: write the checkpoint (params-only, float32, scanned)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from converters.mapping import source_shape
    from converters.orbax_reader import GLOBAL_LEAVES, LAYER_LEAVES
    from converters.sizes import SIZES

    d = SIZES[size].dims
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    tree: dict = {}
    for name, keys in list(GLOBAL_LEAVES.items()) + [(n, ("decoder", "layers") + k) for n, k in LAYER_LEAVES.items()]:
        a = leaf_array(name, source_shape(name, d, scanned=True))
        spec = ["fsdp" if a.shape[0] % fsdp == 0 else None] + [None] * (a.ndim - 1)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(*spec)))
        del a
    state = {"params": {"params": tree}, "opt_state": {}, "step": jnp.int32(0)}
    mgr = ocp.CheckpointManager(out, item_names=("items",),
                                item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
    mgr.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)))
    mgr.wait_until_finished()
    mgr.close()


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


CPU_S: list[float] = []  # CPU seconds (user + sys) of each child, in order


def run_child(cmd: list[str], env: dict, cwd: str = REPO) -> tuple[float, int, int]:
    """(seconds, exit status, peak RSS bytes of the child); its CPU seconds go to CPU_S."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    CPU_S.append(ru.ru_utime + ru.ru_stime)
    return time.monotonic() - t, p.returncode, ru.ru_maxrss * 1024


def spot_check(hf_dir: str, size: str, dtype: str, query_scale: str) -> str:
    """Compare a few converted tensors with the synthetic truth, mapped independently here."""
    import numpy as np
    from safetensors import safe_open

    from converters.mapping import source_shape
    from converters.sizes import SIZES

    d = SIZES[size].dims
    idx = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"]
    layer = d.layers // 2
    q = leaf_array("query", source_shape("query", d, True))[:, layer]  # [E, H, D]
    q = np.concatenate([q[..., 0::2], q[..., 1::2]], -1) * (math.sqrt(d.head_dim) if query_scale == "fold" else 1)
    want = {f"model.layers.{layer}.self_attn.q_proj.weight": q.reshape(d.emb, -1).T,
            f"model.layers.{layer}.mlp.down_proj.weight": leaf_array("wo", source_shape("wo", d, True))[:, layer].T,
            "lm_head.weight": leaf_array("logits", source_shape("logits", d, True)).T}
    worst = 0.0
    for name, w in want.items():
        with safe_open(os.path.join(hf_dir, idx[name]), framework="pt") as f:
            got = f.get_tensor(name).float().numpy()
        worst = max(worst, float(np.abs(got - w).max() / np.abs(w).max()))
    tol = 1e-6 if dtype == "float32" else 8e-3
    return f"{'ok' if worst <= tol else 'MISMATCH'} (max rel diff {worst:.1e} over {len(want)} tensors)"


def timed_cp(items: str, dst: str) -> float:
    """Seconds for `cp -r` of the item dir, from a synced start to a `sync -f` of the copy."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    t = time.monotonic()
    _, rc, _ = run_child(["cp", "-r", items, dst], dict(os.environ))
    if rc:
        raise SystemExit(f"cp failed rc={rc}")
    subprocess.run(["sync", "-f", dst], check=False)
    s = time.monotonic() - t
    shutil.rmtree(dst)
    return s


def timed_convert(cmd: list[str], env: dict, out: str, cwd: str = REPO) -> tuple[float, int, int]:
    """(seconds from a synced start to a `sync -f` of the output, exit status, peak RSS bytes)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t = time.monotonic()
    _, rc, rss = run_child(cmd, env, cwd)
    subprocess.run(["sync", "-f", out if os.path.exists(out) else os.path.dirname(out)], check=False)
    return time.monotonic() - t, rc, rss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="llama3.1-05b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workdir", default="/tmp/kdgen-bench-convert")
    ap.add_argument("--block-mb", type=int, default=64)
    ap.add_argument("--fsdp", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-tree", help="a checkout whose converter is timed too, each round")
    ap.add_argument("--keep", action="store_true", help="keep the converted model")
    ap.add_argument("--warm-cp", action="store_true",
                    help="an untimed cp -r (removed again) right before each timed cp and each baseline conversion: "
                         "every timed run then starts just after 2.55 GB of page cache was freed (see RESULTS.md)")
    ap.add_argument("--synth", action="store_true", help=argparse.SUPPRESS)
    a, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    ck_root = os.path.join(a.workdir, f"ckpt-{a.size}-f32-scanned-fsdp{a.fsdp}")
    if a.synth:
        synth(ck_root, a.size, a.fsdp)
        return 0
    from converters.sizes import SIZES
    from kdgen import tiny  # the bench may use kdgen's helpers; converters/ never does

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    items = os.path.join(ck_root, "0", "items")
    os.makedirs(a.workdir, exist_ok=True)
    if not os.path.exists(os.path.join(items, "commit_success.txt")):
        shutil.rmtree(ck_root, ignore_errors=True)
        t = time.monotonic()
        subprocess.run([sys.executable, __file__, "--synth", "--size", a.size, "--fsdp", str(a.fsdp),
                        "--workdir", a.workdir], check=True,
                       env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.fsdp}"))
        print(f"synthesized {items} in {time.monotonic() - t:.0f}s")
    ck_bytes = du(items)
    tok = os.path.join(a.workdir, "tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        tiny.make_tokenizer(tok)
    d = SIZES[a.size].dims

    # Both timings start after a sync and end after `sync -f` of what they wrote (so neither hides
    # its writes in the page cache); the source is in the page cache for both (read in round 0).
    out = os.path.join(a.workdir, f"hf-{a.size}-{a.dtype}")
    cp_dir = os.path.join(a.workdir, "cp-copy")
    cmd = [sys.executable, "-m", "converters.cli", "convert", "--checkpoint", items, "--out", out,
           "--model-size", a.size, "--query-scale", "fold", "--rope-scaling", "llama3", "--tokenizer", tok,
           "--dtype", a.dtype, "--block-mb", str(a.block_mb), "--allow-vocab-padding", "True", *extra]
    timed_cp(items, cp_dir)  # warm the page cache with the source
    rounds, base = [], []
    def warm() -> None:
        if a.warm_cp:
            timed_cp(items, cp_dir)
            CPU_S.pop()

    for r in range(a.rounds):
        warm()
        cp_s = timed_cp(items, cp_dir)
        cp_cpu = CPU_S[-1]
        conv_s, rc, rss = timed_convert(cmd, env, out)
        conv_cpu = CPU_S[-1]
        if rc:
            print(f"conversion failed rc={rc}")
            return 1
        rounds.append((cp_s, conv_s, rss, cp_cpu, conv_cpu))
        line = (f"round {r}: cp {cp_s:.2f} s ({cp_cpu:.2f} s CPU), convert {conv_s:.2f} s ({conv_cpu:.2f} s CPU), "
                f"convert/cp speed {cp_s / conv_s:.3f}, peak RSS {rss / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}")
        if a.baseline_tree:
            bcmd = [out + "-base" if x == out else x for x in cmd if x not in extra]  # old flags only
            tree = os.path.abspath(a.baseline_tree)  # cwd too: `python -m` puts the cwd first on sys.path
            warm()
            b_s, brc, brss = timed_convert(bcmd, dict(env, PYTHONPATH=tree), out + "-base", cwd=tree)
            b_cpu = CPU_S[-1]
            if brc:
                print(f"baseline conversion failed rc={brc}")
                return 1
            base.append((cp_s, b_s, brss, b_cpu))
            line += f"; baseline {b_s:.2f} s ({b_cpu:.2f} s CPU), speed {cp_s / b_s:.3f}, peak RSS {brss / 2**20:.0f} MiB"
        print(line, flush=True)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    cp_s, conv_s = med([x[0] for x in rounds]), med([x[1] for x in rounds])
    ratio = med([x[0] / x[1] for x in rounds])
    rss = max(x[2] for x in rounds)
    out_bytes = du(out)
    item = 4 if a.dtype == "float32" else 2
    layer_out = d.layer_bytes(item)
    layer_f32 = d.layer_bytes(4)
    target = 1.5 * (layer_out + GIB)
    check = spot_check(out, a.size, a.dtype, "fold")
    res = {
        "size": a.size, "dtype": a.dtype, "block_mb": a.block_mb, "fsdp_chunks": a.fsdp, "rounds": a.rounds,
        "extra_flags": extra, "warm_cp": a.warm_cp, "load_avg_1m": round(os.getloadavg()[0], 1),
        "checkpoint_bytes": ck_bytes, "output_bytes": out_bytes,
        "convert_s_median": round(conv_s, 2), "convert_MBps": round(ck_bytes / 1e6 / conv_s, 1),
        "cp_s_median": round(cp_s, 2), "cp_MBps": round(ck_bytes / 1e6 / cp_s, 1),
        "speed_ratio_vs_cp_median": round(ratio, 3),
        "convert_cpu_s_median": round(med([x[4] for x in rounds]), 2), "cp_cpu_s_median": round(med([x[3] for x in rounds]), 2),
        "peak_rss_bytes_max": rss, "largest_layer_bytes_out": layer_out, "largest_layer_bytes_f32": layer_f32,
        "rss_target_bytes": int(target), "rss_over_layer_plus_1GiB": round(rss / (layer_out + GIB), 3),
        "spot_check": check,
    }
    if base:
        res["baseline"] = {"tree": a.baseline_tree, "convert_s_median": round(med([x[1] for x in base]), 2),
                           "speed_ratio_vs_cp_median": round(med([x[0] / x[1] for x in base]), 3),
                           "convert_cpu_s_median": round(med([x[3] for x in base]), 2),
                           "peak_rss_bytes_max": max(x[2] for x in base)}
        shutil.rmtree(out + "-base", ignore_errors=True)
    print(f"checkpoint   {ck_bytes / 1e9:.2f} GB (float32 scanned, {a.fsdp} chunks along embed) -> "
          f"{out_bytes / 1e9:.2f} GB {a.dtype}")
    print(f"convert      {conv_s:.1f} s = {res['convert_MBps']} MB/s of checkpoint (median of {a.rounds})")
    print(f"cp -r        {cp_s:.1f} s = {res['cp_MBps']} MB/s   (convert / cp speed, median of rounds = {ratio:.3f})")
    print(f"peak RSS     {rss / 2**20:.0f} MiB (max of rounds); largest layer {layer_out / 2**20:.0f} MiB ({a.dtype}), "
          f"{layer_f32 / 2**20:.0f} MiB (f32); target < 1.5 x (layer + 1 GiB) = {target / 2**20:.0f} MiB: "
          f"{'ok' if rss < target else 'OVER'} ({res['rss_over_layer_plus_1GiB']}x)")
    print(f"spot check   {check}")
    if base:
        b = res["baseline"]
        print(f"baseline     {b['convert_s_median']} s median, convert/cp speed {b['speed_ratio_vs_cp_median']}, "
              f"peak RSS {b['peak_rss_bytes_max'] / 2**20:.0f} MiB ({a.baseline_tree})")
    print(json.dumps(res))
    if not a.keep:
        shutil.rmtree(out)
    return 0 if rss < target and check.startswith("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""ABBA comparison of two converter trees on bench_convert.py's synthetic checkpoint.

    JAX_PLATFORMS=cpu flock /tmp/bench.lock .venv/bin/python bench/ab_convert.py TREE_A TREE_B ROUNDS [CONVERT FLAGS]

Each round converts with both trees, alternating which goes first, and every conversion is preceded
by an untimed `cp -r` of the item dir that is removed again (set AB_WARM=0 to skip it): on the dev
VM freed pages go back to the host, and a run that follows another one's exit by a few seconds pays
for fresh pages (bench/RESULTS.md). Run bench_convert.py once first (it synthesizes the checkpoint).
Prints one line per round, the medians (time, CPU) and how often A was faster.
"""
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_convert as B  # noqa: E402

ta, tb, n = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), int(sys.argv[3])
extra = sys.argv[4:]
W = "/tmp/kdgen-bench-convert"
items = f"{W}/ckpt-llama3.1-05b-f32-scanned-fsdp8/0/items"
cp_dir, out = f"{W}/cp-copy", f"{W}/ab-out"


def cmd(o):
    return [sys.executable, "-m", "converters.cli", "convert", "--checkpoint", items, "--out", o,
            "--model-size", "llama3.1-05b", "--query-scale", "fold", "--rope-scaling", "llama3",
            "--tokenizer", f"{W}/tokenizer", "--dtype", "bfloat16", "--block-mb", "64",
            "--allow-vocab-padding", "True", *extra]


res = {ta: [], tb: []}
B.timed_cp(items, cp_dir)
for r in range(n):
    line = f"round {r}:"
    for t in ((ta, tb) if r % 2 == 0 else (tb, ta)):
        if os.environ.get("AB_WARM", "1") != "0":
            B.timed_cp(items, cp_dir)
            B.CPU_S.pop()
        s, rc, rss = B.timed_convert(cmd(out), dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=t), out, cwd=t)
        if rc:
            raise SystemExit(f"{t}: conversion failed rc={rc}")
        res[t].append((s, B.CPU_S[-1], rss))
        line += f" | {t} {s:.2f} s ({B.CPU_S[-1]:.2f} CPU, {rss >> 20} MiB)"
    print(line, flush=True)
subprocess.run(["rm", "-rf", out], check=False)
for t, v in res.items():
    print(f"{t}: median {statistics.median(x[0] for x in v):.2f} s, CPU {statistics.median(x[1] for x in v):.2f} s, "
          f"max RSS {max(x[2] for x in v) >> 20} MiB")
print(f"A faster in {sum(a[0] < b[0] for a, b in zip(res[ta], res[tb]))}/{n} rounds")

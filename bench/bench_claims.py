"""Claim overhead per chunk, and plan + resume over 10,000 chunks, on local disk and on GCS
(a real fake-gcs-server on 127.0.0.1, so latencies are loopback ones: real GCS adds ~10-50 ms a request).

    .venv/bin/python bench/bench_claims.py [--chunks 300] [--threads 4] [--output-kb 16]
                                           [--files 100] [--rows-per-file 1000] [--chunk-size 10]

Part 1, per chunk: take (create-if-absent) + renew (CAS) + output create (create-if-absent of
the chunk object) + release (stat + delete); claim overhead = take + renew + release, compared
with the output create the chunk needs anyway. Sequential (latency) and --threads workers.
Part 2, a 10,000-chunk job: plan from parquet footers, list OUT and parse the row ranges of
10,000 finished chunks (resume), the runner's per-chunk exists() probe, and list_leases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from kdgen import storage  # noqa: E402
from kdgen.fleet.leases import ClaimStore  # noqa: E402
from tests.gcs_server import start_server  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def claim_cycle(out: str, n: int, output: bytes, threads: int, tag: str) -> dict:
    store = ClaimStore(out, f"bench-{tag}", ttl_s=600)
    names = [f"{tag}_rows_{i * 10:07d}_{i * 10 + 10:07d}" for i in range(n)]
    phases = {"take": [], "renew": [], "output": [], "release": []}

    def one(name):
        lease, a = timed(lambda: store.try_take(name))
        assert lease is not None
        ok, b = timed(lambda: store.renew(lease))
        assert ok
        created, c = timed(lambda: storage.create_if_absent(storage.join(out, name + ".jsonl"), output))
        assert created
        _, d = timed(lambda: store.release(lease))
        return a, b, c, d

    t0 = time.perf_counter()
    if threads <= 1:
        res = [one(nm) for nm in names]
    else:
        with ThreadPoolExecutor(threads) as pool:
            res = list(pool.map(one, names))
    wall = time.perf_counter() - t0
    for a, b, c, d in res:
        phases["take"].append(a)
        phases["renew"].append(b)
        phases["output"].append(c)
        phases["release"].append(d)
    ms = {k: 1000 * statistics.mean(v) for k, v in phases.items()}
    ms["claims"] = ms["take"] + ms["renew"] + ms["release"]
    ms["chunks_per_s"] = n / wall
    return ms


def make_dataset(data: str, files: int, rows: int) -> None:
    table = pa.table({"text": [f"row {i} " + "x" * 40 for i in range(rows)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, rows // 4))
    blob = sink.getvalue().to_pybytes()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.write_bytes(storage.join(data, f"shard_{i:05d}.parquet"), blob), range(files)))


def plan_and_resume(base: str, args) -> dict:
    from kdgen.corpus import dataset
    from kdgen.records import naming

    data, out = storage.join(base, "data"), storage.join(base, "out")
    make_dataset(data, args.files, args.rows_per_file)
    p, t_plan = timed(lambda: dataset.plan(data, args.chunk_size, seed=0))
    n = len(p.chunks)
    probe = p.chunks[:1000]
    store = ClaimStore(out, "bench-status")
    with ThreadPoolExecutor(16) as pool:  # before the 10,000 outputs: the emulator's writes slow down with its size
        _, t_claims = timed(lambda: list(pool.map(lambda ch: store.try_take(ch.name), probe)))
    leases, t_leases = timed(store.list_leases)
    assert len(leases) == len(probe)
    with ThreadPoolExecutor(16) as pool:
        _, t_commit = timed(lambda: list(pool.map(
            lambda ch: storage.create_if_absent(naming.output_url(out, ch), b'{"x": 1}\n'), p.chunks)))
    names, t_list = timed(lambda: storage.list_names(out))
    assert len(names) == n, (len(names), n)
    parsed, t_parse = timed(lambda: [dataset.parse_chunk_name(x) for x in names])
    assert all(parsed)
    done, t_resume = timed(lambda: naming.finished_chunk_names(out))
    todo, t_filter = timed(lambda: [ch for ch in p.chunks if ch.name not in done])
    assert not todo
    _, t_exists = timed(lambda: [storage.exists(naming.output_url(out, ch)) for ch in probe])
    return {"chunks": n, "plan_s": t_plan, "commit_all_s": t_commit, "list_s": t_list, "parse_s": t_parse,
            "resume_s": t_resume, "filter_s": t_filter, "exists_ms": 1000 * t_exists / len(probe),
            "list_leases_1000_s": t_leases, "take_1000_threads16_s": t_claims}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=300)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--output-kb", type=int, default=16)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--rows-per-file", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=10)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-claims-")
    output = os.urandom(args.output_kb * 512).hex().encode()  # output-kb KiB of text
    try:
        print(f"# part 1: claim overhead per chunk ({args.chunks} chunks, {args.output_kb} KiB output objects)")
        print(f"{'backend':14s} {'mode':11s} {'take':>7s} {'renew':>7s} {'release':>8s} {'claims':>7s} "
              f"{'output':>7s} {'claims/output':>13s} {'chunks/s':>9s}")
        part1 = {}
        for backend in ("local", "gcs-emulator"):
            with emulator() as server:  # a fresh, empty emulator each time
                base = os.path.join(tmp, "p1") if backend == "local" else server.url("p1")
                for mode, threads in (("sequential", 1), (f"{args.threads} threads", args.threads)):
                    ms = claim_cycle(storage.join(base, f"t{threads}"), args.chunks, output, threads, f"c{threads}")
                    part1[(backend, threads)] = ms
                    print(f"{backend:14s} {mode:11s} {ms['take']:6.2f}m {ms['renew']:6.2f}m {ms['release']:7.2f}m "
                          f"{ms['claims']:6.2f}m {ms['output']:6.2f}m {ms['claims'] / ms['output']:12.2f}x "
                          f"{ms['chunks_per_s']:9.0f}")
        r = part1[("gcs-emulator", 1)]["claims"] / part1[("local", 1)]["claims"]
        print(f"claims cost on the emulator / on local disk (sequential): {r:.1f}x")

        print(f"\n# part 2: plan and resume ({args.files} files x {args.rows_per_file} rows, chunk size {args.chunk_size})")
        for backend in ("local", "gcs-emulator"):
            with emulator() as server:
                base = os.path.join(tmp, "p2") if backend == "local" else server.url("p2")
                f = plan_and_resume(base, args)
            print(f"{backend}: {f['chunks']} chunks; plan (footers) {f['plan_s']:.2f} s; "
                  f"list {f['chunks']} outputs {f['list_s']:.3f} s + parse {f['parse_s']:.3f} s; "
                  f"finished_chunk_names {f['resume_s']:.3f} s; skip-filter {f['filter_s'] * 1000:.1f} ms; "
                  f"exists() per chunk {f['exists_ms']:.2f} ms (x{f['chunks']} = {f['exists_ms'] * f['chunks'] / 1000:.1f} s); "
                  f"1000 takes on 16 threads {f['take_1000_threads16_s']:.2f} s; "
                  f"list_leases of 1000 claims {f['list_leases_1000_s']:.2f} s; "
                  f"(setup: committing {f['chunks']} outputs on 16 threads took {f['commit_all_s']:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def emulator():
    server = start_server()
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    try:
        storage.list_names(server.url("warm-up"))  # open the connection
        yield server
    finally:
        server.stop()

if __name__ == "__main__":
    main()

"""A fleet of kdgen hosts simulated on one machine: the real claim / feeder / commit code, a
stand-in engine, storage with injected latency.

    .venv/bin/python bench/fleet_sim.py --hosts 64 --chunks 10000 [--latency-ms 30] [--scale 0.01]
                                        [--chunk-s 100] [--ttl-s 600] [--slow 2.0] [--procs 2] [--src DIR]

What runs for real: `runner.run` of every host (planning from parquet footers, `_job.json`, the
listing of finished chunks, the feeder's walk and leases, the streaming loop, commits of JSONL
chunk objects, lease releases, heartbeats), each host in its own thread with its own HOST_INDEX,
all against one output directory on local disk (tmpfs). With --procs P the threads are spread
over P processes (host h in process h % P), so that 64 hosts do not wait on one GIL.
What is simulated:
- the engine: kdgen's FakeEngine, a FIFO that "generates" each row by sleeping for the row's work divided by the
  host's speed (rows of one chunk ~ --chunk-s in total, each row's work drawn log-normal,
  sigma 0.3); host speeds uniform in [1 - spread, 1 + spread], host 0 is --slow times slower;
- storage latency: every call of kdgen's storage backends (metered stores put in place with
  kdgen.storage.register) sleeps --latency-ms per GCS request it stands for (the cost table
  COSTS below: e.g. a listing costs one request per 1,000 names, a generation-checked delete
  two, a create that fails two), and is counted. Nested calls count once (the outer one). --backend gcs runs the same fleet on fake-gcs-server behind a counting
  loopback proxy instead (small runs), to check the table against the requests GCS would serve.
Time scaling: every duration (latency, chunk time, lease TTL, and through the TTL the heartbeat
and the feeder's polling; CHECKPOINT_EVERY_S where the tree has it) is multiplied by --scale, so a run takes seconds, not hours; reported
times are divided by --scale again ("real" seconds). Ratios that matter (latency : chunk time :
TTL) are kept. The harness's own CPU is the limit of this scaling: every CPU second it spends is
1/scale simulated seconds in which a host may wait for a core (cpu_s reports it); a figure that
changes with --scale or --procs is the harness's, not the fleet's. On a 2-core machine, 64 hosts
need --procs 2 --scale 0.03 (one process at --scale 0.01 more than doubles the idle fraction:
bench/RESULTS.md, "a harness that no longer shapes the figures").

Reported (one JSON line, and a markdown row with --md):
  req/chunk      storage requests on OUT (claims, chunk objects, listings, _job.json, host
                 reports) per planned chunk, fleet-wide; input/chunk: reads of the corpus
  tail_s         time from 95 % of rows committed to 100 %
  last_exit_s    time from the last commit to the last host's exit
  idle           1 - (sum of engine busy time) / (hosts x (last exit - start))
  idle_or_wasted the same, counting engine time on rows thrown away (backup copies that lost,
                 holdings dropped because a copy won) as idle too
  exact          every planned chunk stored once, with all its rows
--src runs another checkout's kdgen (e.g. the commit before a change) with this same harness;
that kdgen needs kdgen.storage.register and kdgen/engines/fake.py (older trees: run their own bench/fleet_sim.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _src_from_argv() -> str:
    for i, a in enumerate(sys.argv):
        if a == "--src" and i + 1 < len(sys.argv):
            return os.path.abspath(sys.argv[i + 1])
        if a.startswith("--src="):
            return os.path.abspath(a.split("=", 1)[1])
    return REPO


SRC = _src_from_argv()
sys.path.insert(0, SRC)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from kdgen import config as config_mod  # noqa: E402
from kdgen import storage  # noqa: E402
from kdgen.worker import runner
from kdgen.engines.fake import FakeEngine, Script, Vocabulary  # noqa: E402


# ---------------------------------------------------------------- storage latency and counting

def _pages(n: int) -> int:
    return max(1, math.ceil(n / 1000))


def _len(result) -> int:
    try:
        return len(result)
    except TypeError:
        return 0


# GCS requests each call of a storage backend (kdgen.storage.Store) stands for: (args, kwargs, result) -> count.
COSTS = {
    "exists": lambda a, k, r: 1,
    "stat": lambda a, k, r: 1,
    "read_bytes": lambda a, k, r: 1,
    "write_bytes": lambda a, k, r: 1,
    # a conditional upload; when it fails (412) the write-id read-back is a second request
    "create": lambda a, k, r: 1 if r else 2,
    "replace": lambda a, k, r: 1 if r else 2,
    # a conditional DELETE, after a stat unless check_first=False (a lease of a committed chunk)
    "delete": lambda a, k, r: 2 if (len(a) > 1 or k.get("if_generation") is not None) and k.get("check_first", True) else 1,
    "list_stats": lambda a, k, r: _pages(_len(r)),
    "expand": lambda a, k, r: _pages(_len(r)),
    # local stand-in for a pinned gs:// read: the footer and the row groups (two ranged GETs);
    # on gs:// itself the ranged GETs are counted one by one (read_range)
    "open_input": lambda a, k, r: 0 if str(a[0] if a else k.get("url", "")).startswith("gs://") else 2,
    "read_range": lambda a, k, r: 1,
}


class Meter:
    """Puts metered stores in place of kdgen's (storage.register): every call in COSTS sleeps for
    the requests it stands for and is counted; a call a store makes to itself counts once."""

    def __init__(self, latency_s: float, data_dir: str, out_dir: str):
        self.latency_s, self.data_dir, self.out_dir = latency_s, data_dir, out_dir
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (kind, op) -> GCS requests
        self.commits: list[tuple[float, int]] = []  # (time, rows) of each chunk object created
        self.local = threading.local()

    def wrap(self, name: str, fn):
        meter = self

        def wrapped(store, *a, **k):
            if getattr(meter.local, "depth", 0):
                return fn(store, *a, **k)
            meter.local.depth = 1
            try:
                result = fn(store, *a, **k)
            finally:
                meter.local.depth = 0
            n = COSTS[name](a, k, result)
            url = str(a[0]) if a else str(k.get("url", k.get("dir_url", "")))
            kind = "input" if url.startswith(meter.data_dir) else "out"
            if meter.latency_s > 0:
                time.sleep(meter.latency_s * n)
            with meter.lock:
                meter.requests[(kind, name)] += n
                if (name == "create" and result and url.endswith(".jsonl")
                        and url.rsplit("/", 1)[0] == meter.out_dir):
                    parts = url.rsplit("/", 1)[1][:-6].rsplit("_", 2)
                    meter.commits.append((time.monotonic(), int(parts[2]) - int(parts[1])))
            return result

        return wrapped

    def metered(self, store_cls: type):
        """A subclass of store_cls whose calls in COSTS are metered."""
        methods = {name: self.wrap(name, getattr(store_cls, name)) for name in COSTS if hasattr(store_cls, name)}
        return type(f"Metered{store_cls.__name__}", (store_cls,), methods)

    def install(self) -> None:
        self.replaced = {scheme: storage.register(scheme, self.metered(cls)())
                         for scheme, cls in (("file", storage.LocalStore), ("gs", storage.GcsStore))}

    def uninstall(self) -> None:
        for scheme, store in self.replaced.items():
            storage.register(scheme, store)


# ---------------------------------------------------------------- stand-in engine and tokenizer

class FakeTokenizer:
    bos_token_id = None
    chat_template = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (len(t) % 50)] * 4 for t in texts]}

    def batch_decode(self, ids):
        return ["x" * len(x) for x in ids]


# The engine: kdgen's FakeEngine (kdgen/engines/fake.py), serving requests one after another;
# each request's work is drawn here when it is added, log-normal around the row's mean.
SIM_VOCABULARY = Vocabulary(size=64, ordinary=tuple(range(3, 64)), eos=None, decode=lambda ids: "x" * len(ids),
                            max_model_len=512)


def sim_engine(c, speed: float, row_s: float, quantum_s: float, seed: int) -> FakeEngine:
    """Generates by sleeping: each request's work (seconds at speed 1) / speed. Steps of about
    `quantum` seconds of work, so that sleeps stay long enough to be accurate."""
    rng = random.Random(seed)

    def work(request) -> float:
        return row_s * rng.lognormvariate(-0.045, 0.3) / speed  # mean 1.0 x row_s

    return FakeEngine(c, Script(step_s=quantum_s, max_num_seqs=8), SIM_VOCABULARY, latency=work)


def busy_stretches(engine: FakeEngine, gap_s: float) -> tuple[float | None, float | None, list]:
    """(start of the first busy step, end of the last, idle stretches longer than gap_s between)."""
    spans = engine.busy_spans
    if not spans:
        return None, None, []
    gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(spans, spans[1:]) if b_start - a_end > gap_s]
    return spans[0][0], spans[-1][1], gaps


# ---------------------------------------------------------------- the fleet

def make_corpus(data: str, chunks: int, rows_per_chunk: int, files: int) -> None:
    os.makedirs(data, exist_ok=True)
    per_file = math.ceil(chunks / files)
    for f in range(files):
        n = min(per_file, chunks - f * per_file) * rows_per_chunk
        if n <= 0:
            break
        pq.write_table(pa.table({"text": [f"row {f}-{i} some text" for i in range(n)]}),
                       os.path.join(data, f"part-{f:05d}.parquet"), row_group_size=max(rows_per_chunk * 10, 1))


FEEDER_ENDS: list[float] = []  # time.monotonic() when each host's walk ended (--debug)


def _record_feeder_end() -> None:
    from kdgen.worker import feeder

    walk = feeder.Feeder.walk

    def timed_walk(self):
        try:
            walk(self)
        finally:
            FEEDER_ENDS.append(time.monotonic())

    feeder.Feeder.walk = timed_walk


def host_speeds(args) -> list[float]:
    """Every host's speed (the same in every process of a --procs run)."""
    rng = random.Random(args.seed)
    speeds = [1.0 + rng.uniform(-args.spread, args.spread) for _ in range(args.hosts)]
    speeds[0] = speeds[0] / args.slow
    return speeds


def run_hosts(args, hosts: list[int], data: str, out: str, go=None) -> dict:
    """Run `hosts` (host indexes) as threads of this process; `go()` blocks until the fleet's
    common start. Returns what each host did and what storage requests they made."""
    s = args.scale
    meter = Meter(args.latency_ms / 1000 * s, data, out)
    meter.install()
    if args.debug:
        _record_feeder_end()
    rows_per_chunk = args.rows_per_chunk
    row_s = args.chunk_s * s / rows_per_chunk
    speeds = host_speeds(args)
    # Steps of a quarter chunk-time: fine against the chunk time, few enough to keep the
    # harness's own CPU (one Python process for many hosts) small.
    quantum_s = max(row_s, args.chunk_s * s / 4, 0.005)
    exits: dict[int, float] = {}
    errors: dict[int, str] = {}
    summaries: dict[int, object] = {}
    start = threading.Barrier(len(hosts) + 1)

    def config(h: int):
        c = config_mod.from_sources(dict(
            model_path="sim-model", dataset_path=data, output_path=out, chunk_size=rows_per_chunk,
            host_index=h, num_hosts=args.hosts, log_every_s=1e9,
            max_prefill_length=32, max_target_length=48, max_tokens=2, temperature=0.0,
            gen_batch_size=math.ceil(rows_per_chunk * 1.024)), env={})
        # The scaled TTL is below what the CLI accepts (5 s): set it without validation. The
        # periodic partial-progress save (CHECKPOINT_EVERY_S, kdgen trees that have it) is a
        # duration too: scaled, so its storage requests are counted at the real rate.
        scaled = {"lease_ttl_s": args.ttl_s * s}
        if hasattr(c, "tail_backups"):
            scaled["tail_backups"] = not args.no_tail_backups
        if hasattr(c, "checkpoint_every_s"):
            every = c.checkpoint_every_s if args.checkpoint_every_s is None else args.checkpoint_every_s
            scaled["checkpoint_every_s"] = every * s
        return dataclasses.replace(c, **scaled)

    configs = {h: config(h) for h in hosts}
    engines = {h: sim_engine(configs[h], speeds[h], row_s, quantum_s, seed=args.seed + h) for h in hosts}

    def host(h: int) -> None:
        c = configs[h]
        start.wait()
        try:
            summaries[h] = runner.run(c, engine=engines[h], tokenizer=FakeTokenizer())
        except BaseException as e:  # reported, and the run counts as failed
            errors[h] = f"{type(e).__name__}: {e}"
        finally:
            exits[h] = time.monotonic()

    threads = [threading.Thread(target=host, args=(h,), name=f"host{h}", daemon=True) for h in hosts]
    for t in threads:
        t.start()
    if go is not None:
        go()
    start.wait()
    t0 = time.monotonic()
    cpu0 = time.process_time()
    for t in threads:
        t.join()
    cpu = time.process_time() - cpu0
    meter.uninstall()
    per_host = {}
    for h in hosts:
        e, sm = engines[h], summaries.get(h)
        first_busy, last_busy, gaps = busy_stretches(e, gap_s=5 * quantum_s)
        per_host[h] = {
            "speed": speeds[h], "busy_s": e.busy_s, "first_busy": first_busy, "last_busy": last_busy,
            "gaps": gaps, "exit": exits[h], "error": errors.get(h), "engine_rows": e.finished,
            # rows generated here that are in chunk objects this host stored (not read back from
            # another holder's _partial): the rest of engine_rows was work in vain (lost copies)
            "useful_rows": getattr(sm, "rows", 0) - getattr(sm, "rows_reused", 0),
            "chunks_committed": getattr(sm, "chunks_committed", None),
            "backups_stored": getattr(sm, "backups_stored", 0),
            "chunks_lost_race": getattr(sm, "chunks_lost_race", 0)}
    return {"t0": t0, "cpu_s": cpu, "hosts": per_host, "commits": meter.commits, "feeder_ends": list(FEEDER_ENDS),
            "requests": [[kind, op, n] for (kind, op), n in meter.requests.items()]}


def run_children(args, data: str, out: str) -> list[dict]:
    """--procs P: hosts h with h % P == i run as threads of child process i (this script with
    --child i); all start at one instant (time.monotonic is one clock for every process here)."""
    argv = sys.argv[1:] if args.argv is None else list(args.argv)
    procs = []
    try:
        for i in range(args.procs):
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", str(i), "--child-data", data,
                   "--child-out", out]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for i, p in enumerate(procs):  # each says "ready" once its hosts wait at their barrier
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"fleet_sim child {i} failed to start (said {line!r}; its stderr is above)")
        at = time.monotonic() + 0.05
        for p in procs:
            p.stdin.write(f"{at}\n")
            p.stdin.flush()
        results = []
        for i, p in enumerate(procs):
            body = p.stdout.read()
            if p.wait() != 0:
                raise SystemExit(f"fleet_sim child {i} exited with {p.returncode} (its stderr is above)")
            results.append(json.loads(body))
        return results
    finally:  # a child that failed leaves the others waiting: stop them
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def child_main(args) -> None:
    hosts = [h for h in range(args.hosts) if h % args.procs == args.child]

    def go():
        print("ready", flush=True)
        at = float(sys.stdin.readline())
        time.sleep(max(0.0, at - time.monotonic()))

    r = run_hosts(args, hosts, args.child_data, args.child_out, go)
    r["hosts"] = {str(h): v for h, v in r["hosts"].items()}
    sys.stdout.write(json.dumps(r))
    sys.stdout.flush()


def run_fleet(args) -> dict:
    work = tempfile.mkdtemp(prefix="kdgen-fleet-", dir=args.tmp)
    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    make_corpus(data, args.chunks, args.rows_per_chunk, args.files)
    server = proxy = None
    if args.backend == "gcs":  # fake-gcs-server behind a counting loopback proxy: real requests
        if args.procs > 1:
            raise SystemExit("--backend gcs runs in one process (--procs 1)")
        sys.path.insert(0, REPO)
        from tests.gcs_server import start_server
        from tests.proxy import FaultProxy

        server = start_server()
        proxy = FaultProxy(server.endpoint, mode="count", lifetime_s=7200, max_requests=10**9).start()
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.endpoint
        gdata, out = server.url("fleet", "data"), server.url("fleet", "out")
        for name in sorted(os.listdir(data)):
            with open(os.path.join(data, name), "rb") as f:
                storage.write_bytes(storage.join(gdata, name), f.read())
        data = gdata
        proxy.requests, proxy.kinds = 0, {}
    s = args.scale
    if args.procs > 1:
        parts = run_children(args, data, out)
    else:
        parts = [run_hosts(args, list(range(args.hosts)), data, out)]
    t0 = min(p["t0"] for p in parts)
    hosts = {int(h): v for p in parts for h, v in p["hosts"].items()}
    requests = collections.Counter()
    for p in parts:
        for kind, op, n in p["requests"]:
            requests[(kind, op)] += n
    commits = sorted(tuple(c) for p in parts for c in p["commits"])
    errors = {h: v["error"] for h, v in hosts.items() if v["error"]}
    end = max(v["exit"] for v in hosts.values())

    # Exactly once: every planned chunk object present, each with all its rows (not counted).
    http = (proxy.requests, dict(proxy.kinds)) if proxy else None
    names = sorted(n for n in storage.list_names(out) if n.endswith(".jsonl"))
    rows_stored = sum(len(storage.read_bytes(storage.join(out, n)).splitlines()) for n in names)
    total_rows = args.chunks * args.rows_per_chunk
    exact = len(names) == args.chunks and rows_stored == total_rows and not errors

    done, t95 = 0, None
    for t, n in commits:
        done += n
        if t95 is None and done >= 0.95 * total_rows:
            t95 = t
    t100 = commits[-1][0] if commits else end
    req_out = sum(v for (kind, _), v in requests.items() if kind == "out")
    req_in = sum(v for (kind, _), v in requests.items() if kind == "input")
    busy = sum(v["busy_s"] for v in hosts.values())
    # engine time spent on rows that were thrown away (a copy or a holding that lost its race),
    # at each host's mean time per row
    wasted = sum(v["busy_s"] / v["engine_rows"] * max(0, v["engine_rows"] - v["useful_rows"])
                 for v in hosts.values() if v["engine_rows"])
    starts = sorted((v["first_busy"] or end) - t0 for v in hosts.values())
    ends = sorted(end - (v["last_busy"] or t0) for v in hosts.values())
    result = {
        "hosts": args.hosts, "chunks": args.chunks, "latency_ms": args.latency_ms, "scale": s,
        "chunk_s": args.chunk_s, "ttl_s": args.ttl_s, "slow": args.slow, "procs": args.procs,
        "req_per_chunk": round(req_out / args.chunks, 2),
        "input_req_per_chunk": round(req_in / args.chunks, 2),
        "tail_s": round(((t100 - t95) if t95 else 0.0) / s, 1),
        # what the tail would be if the fleet kept its average pace: 5 % of the time to the last commit
        "tail_even_pace_s": round(0.05 * (t100 - t0) / s, 1),
        "last_exit_s": round((end - t100) / s, 1),
        "job_s": round((end - t0) / s, 1),
        "idle": round(1 - busy / (args.hosts * (end - t0)), 4),
        # idle, plus engine time on rows that were thrown away: 1 - useful work / fleet time
        "idle_or_wasted": round(1 - (busy - wasted) / (args.hosts * (end - t0)), 4),
        "exact": exact,
        "errors": dict(list(errors.items())[:3]),
        "wall_s": round(end - t0, 1),
        # the harness's own CPU (every process): each CPU second here is 1/scale simulated seconds
        # in which some host may have waited for a core, so low is faithful
        "cpu_s": round(sum(p["cpu_s"] for p in parts), 1),
        # where the idle time is: before each host's engine first has work, and after it last had
        "start_idle_median_s": round(starts[len(starts) // 2] / s, 1),
        "end_idle_median_s": round(ends[len(ends) // 2] / s, 1),
        "end_idle_max_s": round(ends[-1] / s, 1),
        # the tail's backup copies (kdgen.worker.feeder): stored first, and copies/holdings dropped or lost
        "backups_stored": sum(v["backups_stored"] for v in hosts.values()),
        "lost_or_dropped": sum(v["chunks_lost_race"] for v in hosts.values()),
        # idle stretches while a host still had work ahead: a feeder that did not keep up
        "mid_idle_per_host_s": round(sum(b - a for v in hosts.values() for a, b in v["gaps"]) / len(hosts) / s, 1),
        "ops": {f"{k}:{op}": v for (k, op), v in sorted(requests.items())},
    }
    if http:  # what the emulator really served (OUT and input together), against the cost table
        result["http_requests"], result["http_kinds"] = http
        result["model_requests"] = req_out + req_in
        proxy.stop()
        server.stop()
    if args.debug:
        feeder_ends = sorted((t - t100) / s for p in parts for t in p["feeder_ends"])
        exits_after = sorted((v["exit"] - t100) / s for v in hosts.values())
        print(f"after the last commit: feeders end {feeder_ends[:3]} .. {feeder_ends[-3:]}, hosts exit "
              f"{exits_after[:3]} .. {exits_after[-3:]}", file=sys.stderr)
        # per host: speed, chunks committed, idle at the start / in the middle / at the end
        for h in sorted(hosts, key=lambda h: -(end - (hosts[h]["last_busy"] or t0))):
            v = hosts[h]
            print(f"host {h:3d} speed {v['speed']:.2f} chunks {'?' if v['chunks_committed'] is None else v['chunks_committed']:>4} "
                  f"start {((v['first_busy'] or end) - t0) / s:7.1f} mid {sum(b - a for a, b in v['gaps']) / s:7.1f} "
                  f"end {(end - (v['last_busy'] or t0)) / s:7.1f} exit {(v['exit'] - t0) / s:8.1f}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--rows-per-chunk", type=int, default=10, help="rows per chunk (CHUNK_SIZE)")
    ap.add_argument("--files", type=int, default=0, help="parquet files (default: one per 1,000 chunks)")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="per storage request, before scaling")
    ap.add_argument("--chunk-s", type=float, default=100.0, help="mean engine time of one chunk, before scaling")
    ap.add_argument("--ttl-s", type=float, default=600.0, help="LEASE_TTL_S, before scaling")
    ap.add_argument("--scale", type=float, default=0.01, help="multiply every duration by this")
    ap.add_argument("--spread", type=float, default=0.1, help="host speeds uniform in [1-spread, 1+spread]")
    ap.add_argument("--slow", type=float, default=2.0, help="host 0 is this many times slower")
    ap.add_argument("--checkpoint-every-s", type=float, default=None,
                    help="CHECKPOINT_EVERY_S before scaling (default: the job's default; 0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tail-backups", action="store_true", help="TAIL_BACKUPS=0 (trees that have it)")
    ap.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--src", default=REPO, help="checkout whose kdgen to run")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--md", action="store_true", help="also print a markdown table row")
    ap.add_argument("--debug", action="store_true", help="print a line per host (stderr)")
    ap.add_argument("--procs", type=int, default=1,
                    help="run the hosts in this many processes (host h in process h %% P), so that 64 hosts "
                         "do not share one GIL; default 1 (threads of this process)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=("local", "gcs"), default="local",
                    help="gcs: fake-gcs-server behind a counting proxy, to check the cost table (small runs)")
    args = ap.parse_args(argv)
    args.argv = argv  # what children of a --procs run are given (None: sys.argv)
    if not args.files:
        args.files = max(1, args.chunks // 1000)
    return args


def main() -> None:
    args = parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    if args.child is not None:
        child_main(args)
        return
    r = run_fleet(args)
    print(json.dumps(r))
    if args.md:
        print(f"| {r['hosts']} | {r['chunks']} | {r['req_per_chunk']} | {r['input_req_per_chunk']} | "
              f"{r['tail_s']} ({r['tail_even_pace_s']}) | {r['last_exit_s']} | {r['idle'] * 100:.1f} % | "
              f"{r['idle_or_wasted'] * 100:.1f} % | {r['start_idle_median_s']} | {r['end_idle_median_s']} | {r['job_s']} | "
              f"{'yes' if r['exact'] else 'NO'} | {r['wall_s']} |")
    if not r["exact"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Front-end CPU per generated token: raw lean vLLM vs kdgen's whole job, on one engine (issue 23).

    .venv/bin/python bench/frontend.py [--ks 0,5,20,64] [--ns 1,4] [--formats jsonl,parquet]
        [--sizes 1024,2048] [--rounds 3] [--stages] [--replay] [--quick]

What is measured: the CPU time of THIS process (`time.process_time()`: user + system time of
every thread of the process, children excluded). With vLLM's `LLM` class the engine core runs
in a child process, so this is exactly the front-end: vLLM's output processing (its client's
output thread and the output processor in the caller), kdgen's feeder, loop, conversion,
records, encoding and commits. `resource.getrusage(RUSAGE_SELF)` would give the same sum; the
child's time is in neither. CPU time, unlike wall time, is robust to the other load on a shared
machine (the engine core's speed does not enter it).

Per generated token by the SLOPE of two sizes: (cpu(large) - cpu(small)) / (tokens(large) -
tokens(small)), so fixed costs (plan, tokenizer, job file, engine warm-up, pool start and
drain) cancel. Each round runs every variant at both sizes, interleaved; tables give medians
over rounds.

  raw     `LLM.generate(prompt_token_ids, SamplingParams(n, temperature, max_tokens,
          logprobs=k, flat_logprobs=True, detokenize=False))`: the leanest vLLM allows, the
          prompt token ids kdgen sends (already tokenized: a head start), one call.
  kdgen   `kdgen.worker.runner.run` on the same corpus and the same engine object (footers, parquet
          reads, tokenizing, streaming pool, leases, conversion, text decoding, records,
          encoding, commits) with OUTPUT_FILE_FORMAT=jsonl or parquet; its engine takes the lean
          output path (kdgen.engines.vllm_lean) where it applies. --standard adds kdgen-std-FORMAT:
          the same job with vLLM's own output processor (VllmEngine.lean_allowed = False).

n=1 is greedy (both sides generate the same tokens: checked). n>1 with greedy gives n
identical samples, so n>1 uses --temperature (0.8, MaxText's) on BOTH sides; then the two
sides draw different tokens and lengths, which the per-token figure absorbs. n>1 reads
size / n rows, so every configuration generates about the same number of tokens.

--stages adds one instrumented kdgen run per size: functions of kdgen's modules are wrapped at
run time (in this process only; kdgen is not edited) by wrappers that add up the thread CPU
time (time.thread_time) spent inside them, exclusive of nested stages; the table gives each
stage's slope in us per token. The instrumented run is separate from the measured rounds (the
wrappers cost ~1 us per call).

--replay records the engine's finished outputs (kdgen's `Finished` objects) during that run and
replays them through `ReplayEngine`, an object with kdgen's engine interface (add_many / step /
num_unfinished / abort / abort_all / close), as fast as the job asks, with vLLM's step cadence
(at most max_num_seqs sequences advance one token per step): kdgen's own ceiling with no model
and no vLLM output processing. The replay starts after vLLM's conversion to `Finished`, so
kdgen's conversion (VllmEngine.step) and text decoding are NOT in the replay figure; the stage
table of the real run gives them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import heapq
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


# ---------------------------------------------------------------- the arithmetic

@dataclasses.dataclass
class Run:
    cpu_s: float  # CPU time of this process (all threads), children excluded
    tokens: int  # generated tokens (all samples)
    wall_s: float
    threads_s: float = 0.0  # of cpu_s: threads not kdgen's nor main (vLLM's output socket thread, ZMQ), from /proc


def slope_us(small: Run, large: Run) -> float:
    """Microseconds of CPU per generated token between two sizes: fixed costs cancel."""
    if large.tokens <= small.tokens:
        raise ValueError(f"the larger size generated no more tokens ({large.tokens} <= {small.tokens})")
    return (large.cpu_s - small.cpu_s) / (large.tokens - small.tokens) * 1e6


def measure(fn) -> Run:
    """Run fn() -> generated tokens, timing this process's CPU and the wall clock."""
    gc.collect()  # garbage of the previous run is not this run's cost
    t0 = outside_threads_cpu()
    c0, w0 = time.process_time(), time.perf_counter()
    tokens = fn()
    r = Run(time.process_time() - c0, tokens, time.perf_counter() - w0)
    r.threads_s = sum(v - t0[t] for t, v in outside_threads_cpu().items() if t in t0)
    return r


def threads_slope_us(small: Run, large: Run) -> float:
    """The part of slope_us spent in vLLM's client threads."""
    return (large.threads_s - small.threads_s) / (large.tokens - small.tokens) * 1e6


# ---------------------------------------------------------------- per-stage instrumentation

class Stages:
    """Wrap functions of kdgen's modules at run time; add up the thread CPU time spent inside
    each stage, exclusive of nested stages (a per-thread stack). An `absorb` stage keeps the
    stages nested in it (partial saves build records too: that is the save's cost)."""

    def __init__(self):
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._undo: list[tuple[object, str, object, bool]] = []

    def wrap(self, owner, name: str, stage: str, absorb: bool = False) -> None:
        own = name in getattr(owner, "__dict__", {})
        raw = owner.__dict__[name] if own else None
        orig = getattr(owner, name)  # on a class: the plain function (self comes in *a)
        tls, lock, cpu, calls = self._tls, self._lock, self.cpu, self.calls

        def wrapper(*a, **kw):
            stack = getattr(tls, "stack", None)
            if stack is None:
                stack = tls.stack = []
            if stack and stack[-1][2]:
                return orig(*a, **kw)
            t0 = time.thread_time()
            stack.append([stage, 0.0, absorb])
            try:
                return orig(*a, **kw)
            finally:
                frame = stack.pop()
                dt = time.thread_time() - t0
                if stack:
                    stack[-1][1] += dt
                with lock:
                    cpu[stage] += dt - frame[1]
                    calls[stage] += 1

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, raw, own))

    def undo(self) -> None:
        for owner, name, raw, own in reversed(self._undo):
            if own:
                setattr(owner, name, raw)
            else:
                delattr(owner, name)
        self._undo = []

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.cpu)


# Stage names, in table order.
VLLM_STEP = "engine loop: vLLM step (vLLM's output processing)"
ENQUEUE = "engine loop: enqueue requests"
REPLAY_STEP = "engine loop: replay engine"
CONVERT = "output handling (VllmEngine.step conversion)"
DECODE = "text decoding"
PUMP = "job loop (pool, schedule, ticks)"
READ = "reading rows (parquet)"
PROMPTS = "prompts and tokenization"
FEEDER = "feeder walk (leases, listings)"
RECORDS = "encoding: record building"
ENCODE = "encoding: JSON / Arrow + parquet"
COMMIT = "commits (create, claims, cleanup)"
PARTIAL = "partial saves"
THREADS = "vLLM's client threads (output socket thread, ZMQ I/O)"
OTHER = "other (unattributed)"
STAGE_ORDER = [VLLM_STEP, ENQUEUE, REPLAY_STEP, CONVERT, DECODE, PUMP, READ, PROMPTS, FEEDER, RECORDS, ENCODE,
               COMMIT, PARTIAL, THREADS, OTHER]


def instrument(engine) -> Stages:
    """The stage map: which function of which kdgen module is which stage."""
    from kdgen import prompts
    from kdgen.corpus import dataset
    from kdgen.engines import vllm_engine as engine_mod
    from kdgen.worker import commit, feeder, loop, saves
    from kdgen.fleet import partial
    from kdgen.records import builders, chunk_object

    st = Stages()
    engine = engine.engine if isinstance(engine, RecordingEngine) else engine
    adapter = getattr(engine, "vllm", None)  # the real vLLM engine (kdgen.engines.vllm_adapter)
    if adapter is not None:
        st.wrap(adapter, "step", VLLM_STEP)  # vLLM's output path: its step and output processor
        st.wrap(adapter.core, "get_output", VLLM_STEP)  # lean path: the engine core's outputs, as they come
        st.wrap(adapter.llm, "enqueue", ENQUEUE)
        st.wrap(engine_mod.VllmEngine, "step", CONVERT)  # lean: the outputs' loop and the conversion
        if getattr(engine, "_text_decoder", None) is not None:  # else vLLM decodes (inside its step)
            st.wrap(engine, "_text_decoder", DECODE)
    else:
        st.wrap(type(engine), "step", REPLAY_STEP)
        st.wrap(type(engine), "add_many", REPLAY_STEP)
    st.wrap(loop, "pump", PUMP)
    st.wrap(dataset, "read_chunk_rows", READ)
    st.wrap(prompts.PromptBuilder, "build_table", PROMPTS)
    st.wrap(feeder.Feeder, "run", FEEDER)
    st.wrap(builders, "records", RECORDS)
    st.wrap(chunk_object, "encode_chunk", ENCODE)
    st.wrap(commit.Committer, "commit", COMMIT)
    st.wrap(saves, "row_of", PARTIAL, absorb=True)
    st.wrap(partial, "write_segment", PARTIAL, absorb=True)
    return st


def outside_threads_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads that are neither the main thread nor kdgen's
    (vLLM's output socket thread, ZMQ's I/O threads, native pools), by name and id, from /proc
    (clock ticks). Callers count only threads alive at both ends (per-run threads die first)."""
    ticks = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid))
        if int(tid) == main or (name or "").startswith("kdgen"):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if name is None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
        except OSError:
            continue
        out[f"{name}#{tid}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


# ---------------------------------------------------------------- replay

class RecordingEngine:
    """Wraps a kdgen engine; remembers each finished request's Finished by (prompt ids, max_tokens)."""

    def __init__(self, engine):
        self.engine = engine
        self.recorded: dict[tuple, list] = collections.defaultdict(list)
        self._keys: dict[str, tuple] = {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_many(self, requests, **extra) -> None:
        for r in requests:
            self._keys[r[0]] = (tuple(r[1]), r[2])
        self.engine.add_many(requests, **extra)

    def step(self):
        done = self.engine.step()
        for f in done:
            key = self._keys.pop(f.request_id, None)
            if key is not None:
                self.recorded[key].append(f)
        return done


class ReplayEngine:
    """kdgen's engine interface over recorded Finished objects: no model. Requests are matched
    to recordings by (prompt token ids, max_tokens), in recording order for repeats. Each step
    advances up to `max_num_seqs` running sequences by one token (admitting waiting requests
    first, as vLLM's scheduler does) and returns those whose recorded samples are complete, so
    the job sees vLLM's cadence of finishes per step, at no cost of its own beyond a heap."""

    def __init__(self, recorded: dict[tuple, list], max_num_seqs: int = 256, max_model_len: int = 512):
        self.recorded = {k: collections.deque(v) for k, v in recorded.items()}
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self._waiting: collections.deque = collections.deque()  # (request id, Finished)
        self._running: list = []  # heap of (finish step, order, request id, Finished, seqs)
        self._live: set[str] = set()
        self._seqs = 0  # sequences running (a request of n samples holds n)
        self._step = 0
        self._order = itertools.count()

    def set_sampling(self, c) -> None:
        pass

    def add_many(self, requests, **extra) -> None:
        for r in requests:
            rid, ids, max_tokens = r[0], r[1], r[2]
            queue = self.recorded.get((tuple(ids), max_tokens))
            if not queue:
                raise KeyError(f"replay: no recorded output for a prompt of {len(ids)} tokens with max_tokens "
                               f"{max_tokens}: record with the same corpus and settings")
            self._waiting.append((rid, dataclasses.replace(queue.popleft(), request_id=rid)))
            self._live.add(rid)

    def num_unfinished(self) -> int:
        return len(self._live)

    def step(self) -> list:
        self._step += 1
        while self._waiting and (self._seqs == 0 or self._seqs + len(self._waiting[0][1].samples) <= self.max_num_seqs):
            rid, f = self._waiting.popleft()
            if rid not in self._live:
                continue
            seqs = max(len(f.samples), 1)
            length = max((len(s.token_ids) for s in f.samples), default=1)
            heapq.heappush(self._running, (self._step + max(length, 1) - 1, next(self._order), rid, f, seqs))
            self._seqs += seqs
        done = []
        while self._running and self._running[0][0] <= self._step:
            _, _, rid, f, seqs = heapq.heappop(self._running)
            self._seqs -= seqs
            if rid in self._live:
                self._live.discard(rid)
                done.append(f)
        return done

    def abort(self, request_ids) -> None:
        self._live.difference_update(request_ids)

    def abort_all(self) -> None:
        self._live.clear()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the bench

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="0,5,20,64", help="LOGPROBS values")
    ap.add_argument("--ns", default="1,4", help="NUM_SAMPLES values (n>1 samples at --temperature)")
    ap.add_argument("--formats", default="jsonl,parquet", help="kdgen OUTPUT_FILE_FORMATs")
    ap.add_argument("--sizes", default="1024,2048",
                    help="two row counts; per-token figures are their slope. n > 1 reads size / n rows (about the "
                         "same generated tokens)")
    ap.add_argument("--configs", default="", help="k:n pairs (e.g. 64:1,20:4) instead of every --ks x --ns")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8, help="for n > 1, on both sides")
    ap.add_argument("--stages", action="store_true", help="per-stage table from an instrumented kdgen run")
    ap.add_argument("--replay", action="store_true", help="kdgen's ceiling: replay recorded outputs, no model")
    ap.add_argument("--replay_rounds", type=int, default=5)
    ap.add_argument("--stage_rounds", type=int, default=1, help="instrumented rounds (medians per stage)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: k=20, n=1, parquet, sizes 128,256, 1 round, with --stages --replay")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--target", type=int, default=96, help="max_target_length: ~64 generated tokens")
    ap.add_argument("--chunk_size", type=int, default=128)
    ap.add_argument("--checkpoint_every_s", type=float, default=None,
                    help="kdgen's CHECKPOINT_EVERY_S (default: kdgen's own); small values make partial saves show")
    ap.add_argument("--model", default="", help="HF model dir; default: a tiny Llama made on the spot")
    ap.add_argument("--engine_args", default="dtype=float32,max_model_len=512,enforce_eager=true",
                    help="comma-separated kdgen engine flags")
    ap.add_argument("--json", default="", help="also write every run's figures to this file")
    ap.add_argument("--standard", action="store_true",
                    help="also run kdgen with vLLM's own output path (lean path off): sides kdgen-std-FORMAT")
    args = ap.parse_args()
    if args.quick:
        args.ks, args.ns, args.formats, args.sizes, args.rounds = "20", "1", "parquet", "128,256", 1
        args.stages = args.replay = True
        args.replay_rounds = 3
    ks = [int(k) for k in args.ks.split(",")]
    ns = [int(n) for n in args.ns.split(",")]
    formats = args.formats.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    configs = ([tuple(int(x) for x in kn.split(":")) for kn in args.configs.split(",")] if args.configs
               else list(itertools.product(ks, ns)))
    ks, ns = sorted({k for k, _ in configs}), sorted({n for _, n in configs})
    std_formats = formats if args.standard else []
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        ap.error("--sizes takes two row counts, small then large")

    from vllm import SamplingParams

    from kdgen import config as config_mod, prompts, tiny
    from kdgen.worker import runner
    from kdgen.engines.vllm_engine import VllmEngine

    work = tempfile.mkdtemp(prefix="kdgen-bench-fe-")
    model = args.model or tiny.make_model(os.path.join(work, "model"))

    def rows(size: int, n: int) -> int:
        return max(size // n, args.files)

    data = {}
    for count in sorted({rows(size, n) for size in sizes for n in ns}):
        data[count] = os.path.join(work, f"data-{count}")
        tiny.make_corpus(data[count], num_files=args.files, rows_per_file=count // args.files, seed=1)
    engine_flags = dict(kv.split("=", 1) for kv in args.engine_args.split(",") if kv)
    outs = itertools.count()

    def temperature(n: int) -> float:
        return 0.0 if n == 1 else args.temperature

    def job(size: int, k: int, n: int, fmt: str):
        extra = {} if args.checkpoint_every_s is None else {"checkpoint_every_s": args.checkpoint_every_s}
        return config_mod.from_sources(dict(
            model_path=model, dataset_path=data[rows(size, n)], output_path=os.path.join(work, f"out{next(outs)}"),
            temperature=temperature(n), num_samples=n, logprobs=k, output_file_format=fmt,
            max_prefill_length=args.prefill, max_target_length=args.target, chunk_size=args.chunk_size,
            log_every_s=1e9, **extra, **engine_flags), env={})

    eng = VllmEngine(job(sizes[0], max(ks), min(ns), "jsonl"))  # max_logprobs >= max(ks)
    tok = prompts.load_tokenizer(model)
    raw_prompts: dict[int, tuple[list, list]] = {}  # by row count
    for count in data:
        ps = job_prompts(dataclasses.replace(job(sizes[0], 0, min(ns), "jsonl"), dataset_path=data[count]), tok,
                         eng.max_model_len)
        raw_prompts[count] = ([{"prompt_token_ids": p.token_ids} for p in ps], [p.max_tokens for p in ps])

    def run_raw(size: int, k: int, n: int) -> int:
        ps, budgets = raw_prompts[rows(size, n)]
        lp = dict(logprobs=k, flat_logprobs=True) if k else {}
        params = [SamplingParams(n=n, temperature=temperature(n), max_tokens=b, detokenize=False, **lp)
                  for b in budgets]
        got = eng.llm.generate(ps, params, use_tqdm=False)
        return sum(len(o.token_ids) for r in got for o in r.outputs)

    def run_kdgen(c, engine, lean: bool = True) -> int:
        engine.lean_allowed = lean  # False: vLLM's own output processor (kdgen.engines.vllm_engine)
        try:
            return runner.run(c, engine=engine, tokenizer=tok).generated_tokens
        finally:
            engine.lean_allowed = True
            shutil.rmtree(c.output_path, ignore_errors=True)

    # Warm-up: the engine, and kdgen's first-time costs (lazy imports, caches) in each format.
    eng.llm.generate(raw_prompts[min(data)][0][:64], [SamplingParams(max_tokens=8)] * 64, use_tqdm=False)
    for fmt in formats:
        run_kdgen(dataclasses.replace(job(sizes[0], max(ks), min(ns), fmt), limit=64), eng)
    log: list[dict] = []
    results: dict[tuple, list[float]] = collections.defaultdict(list)  # (k, n, side) -> per-round slopes
    in_threads: dict[tuple, list[float]] = collections.defaultdict(list)  # the same, vLLM's client threads only
    stage_tables: dict[tuple, dict] = {}
    replay_figures: dict[tuple, dict] = {}

    for k, n in configs:
        sides = ["raw"] + [f"kdgen-{fmt}" for fmt in formats] + [f"kdgen-std-{fmt}" for fmt in std_formats]
        for i in range(args.rounds):
            runs: dict[tuple[str, int], Run] = {}
            for size in sizes:
                order = sides if (i + sizes.index(size)) % 2 == 0 else sides[::-1]  # spread drift over sides
                for side in order:
                    if side == "raw":
                        r = measure(lambda: run_raw(size, k, n))
                    else:
                        r = measure(lambda: run_kdgen(job(size, k, n, side.rsplit("-", 1)[1]), eng,
                                                      lean="-std-" not in side))
                    runs[(side, size)] = r
                    log.append(dict(k=k, n=n, side=side, size=size, round=i, **dataclasses.asdict(r)))
                    print(f"k={k} n={n} round {i} {side:14s} rows {rows(size, n):5d}: {r.cpu_s:7.2f} s CPU, "
                          f"{r.tokens:7d} tokens, {r.wall_s:6.1f} s wall", flush=True)
                if n == 1:
                    counts = {s: runs[(s, size)].tokens for s in sides}
                    assert len(set(counts.values())) == 1, f"greedy runs generated different token counts: {counts}"
            for side in sides:
                results[(k, n, side)].append(slope_us(runs[(side, sizes[0])], runs[(side, sizes[1])]))
                in_threads[(k, n, side)].append(threads_slope_us(runs[(side, sizes[0])], runs[(side, sizes[1])]))
            print(f"k={k} n={n} round {i}: " + ", ".join(
                f"{s} {results[(k, n, s)][-1]:.1f} us/token" for s in sides), flush=True)
        if args.stages or args.replay:
            for fmt in formats:
                recorded = {}
                stage_tables[(k, n, fmt)] = stage_slopes(
                    lambda size: job(size, k, n, fmt), sizes, eng, run_kdgen, record=recorded if args.replay else None,
                    rounds=args.stage_rounds)
                print_stages(f"k={k} n={n} {fmt}, real engine", stage_tables[(k, n, fmt)])
                if args.replay:
                    replay_figures[(k, n, fmt)] = replay(
                        lambda size: job(size, k, n, fmt), sizes, recorded, eng, run_kdgen, args.replay_rounds,
                        args.stage_rounds)
                    print_stages(f"k={k} n={n} {fmt}, replay (no model)", replay_figures[(k, n, fmt)]["stages"])
    eng.close()
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nfront-end CPU per generated token (this process, slope of {sizes[0]} -> {sizes[1]} rows / n, "
          f"median of {args.rounds} rounds)\n")
    print("| k | n | format | raw us/token | kdgen us/token | kdgen / raw | kdgen's own share us/token "
          "| rounds raw / kdgen us/token | of which vLLM's output thread, raw / kdgen |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for k, n in configs:
        raw = results[(k, n, "raw")]
        for fmt in formats + [f"std-{f}" for f in std_formats]:
            kd = results[(k, n, f"kdgen-{fmt}")]
            rounds = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(raw, kd))
            print(f"| {k} | {n} | {fmt} | {med(raw):.1f} | {med(kd):.1f} | {med(kd) / med(raw):.3f} | "
                  f"{med(kd) - med(raw):+.1f} | {rounds} | {med(in_threads[(k, n, 'raw')]):.1f} / "
                  f"{med(in_threads[(k, n, f'kdgen-{fmt}')]):.1f} |")
    if replay_figures:
        print("\nkdgen's ceiling: recorded Finished outputs replayed through the engine interface (no model, no vLLM "
              f"output processing), median of {args.replay_rounds} rounds\n")
        print("| k | n | format | replay us/token | ceiling tok/s (1e6 / us) | replay wall tok/s (large size) |")
        print("|---|---|---|---|---|---|")
        for (k, n, fmt), r in replay_figures.items():
            print(f"| {k} | {n} | {fmt} | {r['us']:.2f} | {1e6 / r['us']:,.0f} | {r['wall_rate']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": log,
                       "slopes": {f"{k}/{n}/{s}": v for (k, n, s), v in results.items()},
                       "thread_slopes": {f"{k}/{n}/{s}": v for (k, n, s), v in in_threads.items()},
                       "stages": {f"{k}/{n}/{f}": v for (k, n, f), v in stage_tables.items()},
                       "replay": {f"{k}/{n}/{f}": v for (k, n, f), v in replay_figures.items()}}, f, indent=1)


def job_prompts(c, tok, max_model_len: int) -> list:
    """The prompts (token ids, max_tokens) kdgen sends for job c, in plan order."""
    from kdgen import prompts
    from kdgen.corpus import dataset

    builder = prompts.PromptBuilder(c, tok, max_model_len)
    plan = dataset.plan(c.dataset_path, c.chunk_size, c.seed, columns=builder.columns())
    return [p for ch in plan.chunks
            for p in builder.build(dataset.read_chunk(ch, ["text"]).column("text").to_pylist(), ch.start)]


def instrumented_run(c, engine, run_kdgen) -> tuple[Run, dict[str, float]]:
    """One kdgen run with the stage wrappers on: the run, and CPU seconds per stage."""
    st = instrument(engine)
    try:
        r = measure(lambda: run_kdgen(c, engine))
    finally:
        st.undo()
    cpu = st.snapshot()
    cpu[THREADS] = r.threads_s
    cpu[OTHER] = r.cpu_s - sum(cpu.values())
    return r, cpu


def stage_slopes(make_job, sizes, engine, run_kdgen, record: dict | None = None, rounds: int = 1) -> dict:
    """Per-stage us per token (slope of the two sizes, median of `rounds`) from instrumented
    runs; `record` (a dict) collects the Finished outputs by prompt for the replay (first round)."""
    tables = []
    for i in range(rounds):
        runs, cpus = [], []
        for size in sizes:
            target = engine
            if record is not None and i == 0:
                target = RecordingEngine(engine)
            r, cpu = instrumented_run(make_job(size), target, run_kdgen)
            if target is not engine:
                for key, fs in target.recorded.items():
                    record.setdefault(key, []).extend(fs)
            runs.append(r)
            cpus.append(cpu)
        tables.append(slope_table(runs, cpus))
    return median_table(tables)


def slope_table(runs: list[Run], cpus: list[dict]) -> dict:
    """Per stage: us per token by slope, and at the large size alone (start-up included, no
    subtraction: steadier for small stages)."""
    dtok = runs[1].tokens - runs[0].tokens
    names = [s for s in STAGE_ORDER if s in cpus[0] or s in cpus[1]]
    return {"total_us": slope_us(runs[0], runs[1]), "large_total_us": runs[1].cpu_s / runs[1].tokens * 1e6,
            "stages_us": {s: (cpus[1].get(s, 0.0) - cpus[0].get(s, 0.0)) / dtok * 1e6 for s in names},
            "large_us": {s: cpus[1].get(s, 0.0) / runs[1].tokens * 1e6 for s in names},
            "large": {"tokens": runs[1].tokens, "cpu_s": runs[1].cpu_s, "stage_cpu_s": cpus[1]}}


def median_table(tables: list[dict]) -> dict:
    """Stage by stage medians over rounds."""
    med = statistics.median
    out = {key: med(t[key] for t in tables) for key in ("total_us", "large_total_us")}
    for key in ("stages_us", "large_us"):
        out[key] = {s: med(t[key].get(s, 0.0) for t in tables) for s in tables[0][key]}
    out["large"], out["rounds"] = tables[-1]["large"], len(tables)
    return out


def replay(make_job, sizes, recorded: dict, engine, run_kdgen, rounds: int, stage_rounds: int = 1) -> dict:
    """kdgen's whole job over a ReplayEngine: us per token by slope (median of rounds), and
    one instrumented replay per size for its stage table."""
    def replay_engine():
        return ReplayEngine(recorded, engine.max_num_seqs, engine.max_model_len)

    run_kdgen(make_job(sizes[0]), replay_engine())  # warm-up: first-time costs (imports, caches) are no one's slope
    slopes, walls = [], []
    for _ in range(rounds):
        rs = [measure(lambda: run_kdgen(make_job(size), replay_engine())) for size in sizes]
        slopes.append(slope_us(*rs))
        walls.append(rs[1].tokens / rs[1].wall_s)
    tables = []
    for _ in range(stage_rounds):
        runs, cpus = zip(*(instrumented_run(make_job(size), replay_engine(), run_kdgen) for size in sizes))
        tables.append(slope_table(list(runs), list(cpus)))
    return {"us": statistics.median(slopes), "rounds_us": slopes, "wall_rate": statistics.median(walls),
            "stages": median_table(tables)}


def print_stages(title: str, table: dict) -> None:
    total, large = table["total_us"], table["large_total_us"]
    print(f"\nper-stage CPU, {title} (instrumented, median of {table['rounds']}; slope {total:.2f} us/token, "
          f"large size alone {large:.2f})\n")
    print("| stage | us/token (slope) | share | us/token (large size alone) | share |")
    print("|---|---|---|---|---|")
    for s, us in table["stages_us"].items():
        lu = table["large_us"][s]
        print(f"| {s} | {us:.2f} | {us / total:.0%} | {lu:.2f} | {lu / large:.0%} |")
    print(flush=True)


if __name__ == "__main__":
    main()

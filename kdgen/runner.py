"""The worker loop: claim -> read -> build prompts -> generate -> commit, with progress.

Three activities overlap so that the engine never waits on I/O:
  * a feeder thread (kdgen/feeder.py) walks this host's order of the shared plan, skips finished
    chunks (learned from listings), takes a lease, reads the chunk's rows and builds prompts, and
    queues the chunk (bounded queue);
  * the main thread keeps GEN_BATCH_SIZE requests in the engine, across chunk boundaries, and
    steps it;
  * a small pool commits finished chunks (errors object, then the chunk object) and releases
    their leases.
A crash at any point loses only in-flight chunks; their leases expire and any host redoes them.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kdgen import dataset, jobfile, storage, writer
from kdgen.claims import ClaimStore, Heartbeat, machine_identity
from kdgen.config import JobConfig
from kdgen.engine import EngineError, in_flight_target
from kdgen.feeder import ChunkWork, Feeder  # the walk, leases and row reading: kdgen/feeder.py
from kdgen.prompts import PromptBuilder, input_columns, load_tokenizer

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job stopped; the message says why. Finished chunks in OUTPUT_PATH are kept."""


@dataclass
class Summary:
    chunks_total: int = 0
    chunks_done_before: int = 0  # finished by earlier runs or other hosts when we started
    chunks_committed: int = 0  # by this process
    chunks_lost_race: int = 0  # finished here, but another host had stored it first
    rows: int = 0
    error_rows: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0

    def line(self) -> str:
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"done: {self.chunks_committed} chunks committed here ({self.chunks_done_before} were already "
            f"done, {self.chunks_total} in plan), {self.rows} rows, {self.error_rows} error rows, "
            f"{self.samples} samples, {self.generated_tokens} generated tokens in {self.elapsed_s:.1f} s "
            f"({rate:.0f} tok/s)")


def owner_id(c: JobConfig) -> str:
    """Stable across restarts of the same host (HOST_ID, else the machine id, else the hostname,
    and the host index), so a restarted host can take its own leases back."""
    identity, _ = machine_identity(c.host_id)
    return f"{identity}:{c.host_index}{os.environ.get('KDGEN_OWNER_SUFFIX', '')}"


def claim_store(c: JobConfig) -> ClaimStore:
    """This host's view of the leases in OUTPUT_PATH."""
    _, source = machine_identity(c.host_id)
    return ClaimStore(c.output_path, owner_id(c), ttl_s=c.lease_ttl_s, identity_source=source)


class Progress:
    """Progress lines in the log, and OUT/_hosts/{owner}.json for `kdgen status`."""

    def __init__(self, c: JobConfig, summary: Summary, todo_rows: int):
        self.every = c.log_every_s
        self.num_hosts = c.num_hosts
        self.report_url = storage.join(c.output_path, "_hosts", owner_id(c).replace(":", "_") + ".json")
        self.owner = owner_id(c)
        self.s = summary
        self.todo_rows = todo_rows
        self.t0 = time.time()
        self.last = self.t0

    def maybe_log(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rows_s = self.s.rows / dt
        left = max(self.todo_rows - self.s.rows - self.s.error_rows, 0)
        eta = left / (rows_s * self.num_hosts) if rows_s > 0 else float("inf")
        done = self.s.chunks_done_before + self.s.chunks_committed
        log.info(
            "chunks %d/%d | rows %d (%.1f/s) | errors %d | gen tokens %d (%.0f/s) | ETA %s",
            done, self.s.chunks_total, self.s.rows, rows_s, self.s.error_rows,
            self.s.generated_tokens, self.s.generated_tokens / dt, format_eta(eta))
        self.report(now, finished=force)

    def report(self, now: float, finished: bool) -> None:
        dt = max(now - self.t0, 1e-9)
        body = {"owner": self.owner, "chunks": self.s.chunks_committed, "rows": self.s.rows,
                "error_rows": self.s.error_rows, "generated_tokens": self.s.generated_tokens,
                "rows_per_s": self.s.rows / dt, "tokens_per_s": self.s.generated_tokens / dt,
                "started_at": self.t0, "updated_at": now, "finished": finished}
        try:
            storage.write_bytes(self.report_url, json.dumps(body).encode())
        except Exception as e:  # progress reports are best effort; the output is what matters
            log.warning("could not write %s: %s", self.report_url, e)


def format_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Committer:
    """Commits finished chunks off the engine thread; surfaces the first failure."""

    def __init__(self, c: JobConfig, claims: ClaimStore, heartbeat: Heartbeat, summary: Summary):
        self.c, self.claims, self.heartbeat, self.s = c, claims, heartbeat, summary
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kdgen-commit")
        self.futures: list[Future] = []
        self.lock = threading.Lock()

    def submit(self, work: ChunkWork) -> None:
        self.futures.append(self.pool.submit(self.commit, work))

    def commit(self, work: ChunkWork) -> None:
        chunk, records, errors = work.chunk, [], []
        samples = gen = prompt_tokens = 0
        for i, p in enumerate(work.prompts):
            f = work.results.get(i)
            if f is not None and f.error is not None:  # refused by the endpoint (4xx)
                p.error = f.error
            if p.error is not None:
                errors.append(writer.error_record(chunk, p))
                records.extend(writer.records(self.c, chunk, p, None))
                continue
            records.extend(writer.records(self.c, chunk, p, f))
            samples += len(f.samples)
            gen += sum(len(s.token_ids) for s in f.samples)
            prompt_tokens += len(p.token_ids)
        created = writer.commit_chunk(self.c.output_path, chunk, records, errors)
        if work.lease is not None:
            self.heartbeat.remove(chunk.name)
            self.claims.release(work.lease, committed=True)
        with self.lock:
            if created:
                self.s.chunks_committed += 1
                self.s.rows += len(work.prompts) - len(errors)
                self.s.error_rows += len(errors)
                self.s.samples += samples
                self.s.prompt_tokens += prompt_tokens
            else:
                self.s.chunks_lost_race += 1
                log.info("%s was already stored by another host; kept that copy", chunk.name)

    def check(self) -> None:
        still = []
        for f in self.futures:
            if f.done():
                f.result()  # raises the commit's error
            else:
                still.append(f)
        self.futures = still

    def drain(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []
        self.pool.shutdown()


def prepare(c: JobConfig, builder_columns: dict[str, str]):
    """Create or check OUT/_job.json (settings and the pinned corpus) and return the job's plan;
    fails before any engine start."""
    storage.configure(deadline_s=c.storage_deadline_s)
    if not storage.is_remote(c.output_path) and c.num_hosts > 1:
        fstype = storage.local_fs_type(c.output_path)
        if fstype.startswith("fuse"):
            log.warning("OUTPUT_PATH %s is on a FUSE file system (%s): its exclusive creates and locks hold only "
                        "within this machine, so several hosts may store a chunk twice; give the hosts gs:// "
                        "directly (see README: where the guarantees stop)", c.output_path, fstype)
    return jobfile.prepare(c.output_path, c.fingerprint(), c.dataset_path, c.chunk_size, c.seed, c.limit,
                           columns=builder_columns, extend=c.extend, owner=owner_id(c))


def run(c: JobConfig, engine=None, tokenizer=None) -> Summary:
    """Run this host's share of the job to completion. Pass an engine to reuse one (tests, API)."""
    t0 = time.time()
    plan = prepare(c, input_columns(c))
    done = writer.finished_chunk_names(c.output_path)
    order = [ch for ch in dataset.host_order(plan.chunks, c.host_index, c.num_hosts) if ch.name not in done]
    summary = Summary(chunks_total=len(plan.chunks), chunks_done_before=len(plan.chunks) - len(order))
    log.info("plan: %s; %d chunks already done; host %d/%d starts with %d chunks to visit",
             plan.summary(), summary.chunks_done_before, c.host_index, c.num_hosts, len(order))
    if not order:
        summary.elapsed_s = time.time() - t0
        log.info("nothing to do: every chunk of the plan is in %s", c.output_path)
        return summary

    own_engine = engine is None
    if own_engine:
        from kdgen.engine import make_engine

        engine = make_engine(c)
    engine.set_sampling(c)
    try:
        tok = tokenizer or load_tokenizer(_local_tokenizer(c))
        if c.task == "score":
            from kdgen.score import ScoreBuilder, ScoringEngine

            builder = ScoreBuilder(c, tok, engine.max_model_len)
            return _loop(c, ScoringEngine(engine, c), builder, order, summary, t0)
        builder = PromptBuilder(c, tok, engine.max_model_len)
        return _loop(c, engine, builder, order, summary, t0)
    finally:
        if own_engine:
            engine.close()


def _local_tokenizer(c: JobConfig) -> str:
    from kdgen.engine import localize_model

    return localize_model(c.tokenizer)


def _loop(c, engine, builder, order, summary, t0) -> Summary:
    claims = claim_store(c)
    heartbeat = Heartbeat(claims)
    stop = threading.Event()
    # Read ahead enough chunks to fill the engine on their own (each holds a renewed lease).
    target = in_flight_target(c, engine)
    # Refill in batches: one enqueue per finished request costs more than it saves.
    refill = max(1, target // 8)
    chunks_q: queue.Queue = queue.Queue(maxsize=max(2, -(-target // c.chunk_size) + 1))
    feeder = Feeder(c, order, builder, claims, heartbeat, chunks_q, stop)
    committer = Committer(c, claims, heartbeat, summary)
    progress = Progress(c, summary, sum(ch.num_rows for ch in order))
    old_handlers = _install_signal_handlers(stop)
    feeding: collections.deque[ChunkWork] = collections.deque()  # chunks with prompts left to send
    in_flight: dict[str, ChunkWork] = {}  # chunk name -> work, until committed
    by_request: dict[str, tuple[ChunkWork, int]] = {}
    ids = itertools.count()
    feeder_done = False
    lost_reported: set[str] = set()
    feeder.start()
    try:
        while True:
            # 1. Keep the engine full, pulling new chunks only when the current ones are all sent.
            room = target - engine.num_unfinished()
            if room < refill and engine.num_unfinished() > 0:
                room = 0
            batch = []
            while room > 0 and not stop.is_set():
                if not feeding:
                    if feeder_done:
                        break
                    block = engine.num_unfinished() == 0 and not batch
                    try:
                        work = chunks_q.get(timeout=1.0) if block else chunks_q.get_nowait()
                    except queue.Empty:
                        if block:
                            progress.maybe_log()
                            committer.check()
                            continue
                        break
                    if work is None:
                        feeder_done = True
                        if feeder.error:
                            raise feeder.error
                        break
                    in_flight[work.chunk.name] = work
                    feeding.append(work)
                work = feeding[0]
                for i in work.sendable():
                    rid = str(next(ids))
                    by_request[rid] = (work, i)
                    work.outstanding += 1
                    p = work.prompts[i]
                    batch.append((rid, p.token_ids, p.max_tokens, p.messages))
                    room -= 1
                    if room == 0:
                        break
                if work.next_prompt >= len(work.prompts):
                    feeding.popleft()
                    if work.complete:  # every row was an error row
                        committer.submit(in_flight.pop(work.chunk.name))
            engine.add_many(batch)
            if stop.is_set():
                raise JobError("stopped by signal; in-flight chunks were released for other hosts")
            if engine.num_unfinished() == 0:
                if feeder_done and not feeding:
                    break
                continue
            # 2. Step the engine and hand finished chunks to the committer.
            for f in engine.step():
                work, i = by_request.pop(f.request_id)
                work.results[i] = f
                work.outstanding -= 1
                summary.generated_tokens += sum(len(s.token_ids) for s in f.samples)
                if work.complete and work.chunk.name in in_flight:
                    committer.submit(in_flight.pop(work.chunk.name))
            committer.check()
            progress.maybe_log()
            for name in heartbeat.lost() - lost_reported:
                lost_reported.add(name)
                log.warning("lease on %s was taken over by another host (a late heartbeat); finishing it "
                            "anyway: the first copy stored is kept, the other dropped", name)
        committer.drain()
    except (EngineError, JobError, KeyboardInterrupt) as e:
        _abandon(stop, feeder, committer, claims, heartbeat, in_flight, chunks_q)
        raise JobError(f"{e}. Finished chunks are safe in {c.output_path}; "
                       f"{len(in_flight)} in-flight chunks will be redone by the next run.") from e
    except BaseException:
        _abandon(stop, feeder, committer, claims, heartbeat, in_flight, chunks_q)
        raise
    finally:
        _restore_signal_handlers(old_handlers)
        stop.set()
        heartbeat.stop()
    summary.elapsed_s = time.time() - t0
    progress.maybe_log(force=True)
    log.info(summary.line())
    return summary


def _abandon(stop, feeder, committer, claims, heartbeat, in_flight, chunks_q) -> None:
    """Stop intake, keep what was committed, hand in-flight leases back so others need not wait."""
    stop.set()
    try:
        committer.drain()
    except Exception as e:
        log.error("a commit failed while stopping: %s", e)
    while True:  # leases of chunks the feeder had queued but we never started
        try:
            work = chunks_q.get_nowait()
        except queue.Empty:
            break
        if work is not None:
            in_flight[work.chunk.name] = work
    for work in in_flight.values():
        if work.lease is not None:
            heartbeat.remove(work.chunk.name)
            try:
                claims.release(work.lease)
            except Exception as e:  # the lease will expire on its own
                log.warning("could not release %s: %s", work.chunk.name, e)


def _install_signal_handlers(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    old = {}
    for sig in (signal.SIGTERM,):
        def handler(signum, frame):
            log.warning("signal %d: stopping intake and releasing in-flight chunks", signum)
            stop.set()
        old[sig] = signal.signal(sig, handler)
    return old


def _restore_signal_handlers(old) -> None:
    for sig, h in (old or {}).items():
        signal.signal(sig, h)

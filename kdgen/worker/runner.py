"""The worker loop: claim -> read -> build prompts -> generate -> commit, with progress.

Three activities overlap so that the engine never waits on I/O:
  * a feeder thread (kdgen/worker/feeder.py) walks this host's order of the shared plan, skips finished
    chunks (learned from listings), takes a lease, reads the chunk's rows and builds prompts, and
    queues the chunk (bounded queue);
  * the main thread keeps GEN_BATCH_SIZE requests in the engine, across chunk boundaries, and
    steps it (kdgen.engines.pool.pump over kdgen.worker.schedule.Schedule);
  * a small pool commits finished chunks (one create of the chunk object, records and error
    rows together) and releases their leases.
A crash at any point loses only in-flight chunks; their leases expire and any host redoes them,
reusing the rows saved in OUT/_partial (kdgen.fleet.partial). An engine death restarts the engine
in-process (ENGINE_RESTARTS); a hung engine trips the watchdog (STALL_TIMEOUT_S); SIGTERM lets
in-flight requests finish for PREEMPT_GRACE_S, then saves finished rows and hands leases back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus import jobfile
from kdgen.fleet import partial
from kdgen.worker import preflight
from kdgen.records import builders, chunk_object, naming
from kdgen.fleet.heartbeat import Heartbeat
from kdgen.fleet.leases import ClaimStore, claim_store, owner_id
from kdgen.config import JobConfig
from kdgen.worker.feeder import Feeder  # the walk, leases and row reading: kdgen/worker/feeder.py
from kdgen.worker.schedule import ChunkWork, Schedule
from kdgen.engines.base import EngineError
from kdgen.engines.pool import RequestPool, in_flight_target, pump
from kdgen.views.progress import Progress, unknown_token_warning
from kdgen.prompts import PromptBuilder, input_columns

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job stopped; the message says why. Finished chunks in OUTPUT_PATH are kept."""


@dataclass
class Summary:
    chunks_total: int = 0
    chunks_done_before: int = 0  # finished by earlier runs or other hosts when we started
    chunks_committed: int = 0  # by this process
    chunks_lost_race: int = 0  # finished (or dropped) here, but another host had stored it first
    backups_stored: int = 0  # of chunks_committed: backup copies of chunks other hosts held (the tail)
    rows: int = 0
    rows_reused: int = 0  # of `rows`: finished by an earlier holder of their chunk, read from OUT/_partial
    error_rows: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    unknown_prompt_tokens: int = 0  # of prompt_tokens: the tokenizer's unknown token (TOKENIZER_PATH)
    generated_tokens: int = 0
    elapsed_s: float = 0.0

    def line(self) -> str:
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"done: {self.chunks_committed} chunks committed here"
            f"{f' ({self.backups_stored} as backup copies)' if self.backups_stored else ''} ({self.chunks_done_before} were already "
            f"done, {self.chunks_total} in plan), {self.rows} rows ({self.rows_reused} reused from partial progress), "
            f"{self.error_rows} error rows, "
            f"{self.samples} samples, {self.generated_tokens} generated tokens in {self.elapsed_s:.1f} s "
            f"({rate:.0f} tok/s)" + unknown_token_warning(self.unknown_prompt_tokens, self.prompt_tokens))




class Committer:
    """Commits finished chunks off the engine thread; surfaces the first failure."""

    def __init__(self, c: JobConfig, claims: ClaimStore, heartbeat: Heartbeat, summary: Summary, rescue=None):
        self.c, self.claims, self.heartbeat, self.s = c, claims, heartbeat, summary
        self.rescue = rescue  # saves a chunk's finished rows to OUT/_partial when its commit fails
        self.unk_id: int | None = None  # the tokenizer's unknown token, counted in prompts
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kdgen-commit")
        self.futures: list[Future] = []
        self.lock = threading.Lock()

    def submit(self, work: ChunkWork) -> None:
        self.futures.append(self.pool.submit(self.commit, work))

    def commit(self, work: ChunkWork) -> None:
        try:
            created, n_errors, samples, prompt_tokens, reused = self._store(work)
        except BaseException:
            self._hand_back(work)  # its lease must not wait out its TTL while others idle
            raise
        chunk = work.chunk
        if work.lease is not None:
            self.heartbeat.remove(chunk.name)
            self.claims.release(work.lease, committed=True)
        if work.backup and created:  # the holder learns from its claim's deletion that it can stop
            self.claims.drop(chunk.name)
            log.info("%s: stored the backup copy first; its holder's claim is deleted", chunk.name)
        if work.touched_partials:
            work.wait_saves()  # a segment that lands after the cleanup would be litter
            partial.cleanup(self.c.output_path, chunk.name)
        if created and (work.attempt > 1 or work.quarantined):
            partial.record_faults(self.c.output_path, chunk.name, work.attempt, work.quarantined)
        with self.lock:
            if created:
                self.s.chunks_committed += 1
                self.s.backups_stored += work.backup
                self.s.rows += len(work.prompts) - n_errors
                self.s.rows_reused += reused
                self.s.error_rows += n_errors
                self.s.samples += samples
                self.s.prompt_tokens += prompt_tokens
                if self.unk_id is not None:
                    self.s.unknown_prompt_tokens += sum(p.token_ids.count(self.unk_id) for i, p in
                                                        enumerate(work.prompts) if i in work.results)
            else:
                self.s.chunks_lost_race += 1
                log.info("%s was already stored by another host; kept that copy", chunk.name)

    def _store(self, work: ChunkWork):
        chunk, records, errors = work.chunk, [], []
        samples = prompt_tokens = reused = 0
        for i, p in enumerate(work.prompts):
            f = work.results.get(i)
            row = work.cached.get(i)
            if row is not None and row.error is None:  # finished by an earlier holder (OUT/_partial)
                records.extend(row.records)
                samples += row.samples
                prompt_tokens += row.prompt_tokens
                reused += 1
                continue
            if row is not None:
                p.error = row.error  # quarantined by an earlier holder (audit.error_kind knows it by its text)
                p.error_kind = "quarantined" if row.error.startswith(partial.QUARANTINE_PREFIX) else p.error_kind
            if f is not None and f.error is not None:  # refused by the endpoint (4xx)
                p.error = f.error
            if p.error is not None:
                errors.append(builders.error_record(chunk, p))
                records.extend(builders.records(self.c, chunk, p, None))
                continue
            records.extend(builders.records(self.c, chunk, p, f))
            samples += len(f.samples)
            prompt_tokens += len(p.token_ids)
        created = chunk_object.commit_chunk(self.c, chunk, records, errors)
        return created, len(errors), samples, prompt_tokens, reused

    def _hand_back(self, work: ChunkWork) -> None:
        try:
            if self.rescue is not None:
                self.rescue(work)
        except Exception as e:
            log.warning("could not save the finished rows of %s: %s", work.chunk.name, e)
        if work.lease is not None:
            self.heartbeat.remove(work.chunk.name)
            self.claims.release(work.lease, work.lease.attempt - 1)

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


def prepare(c: JobConfig, builder_columns: dict[str, str], adopt: bool = False):
    """Create or check OUT/_job.json (settings, the pinned corpus, and for a new job the chunk
    layout) and return the job's plan; fails before any engine start. adopt: `kdgen adopt`
    (jobfile.prepare)."""
    storage.configure(deadline_s=c.storage_deadline_s)
    if not storage.is_remote(c.output_path) and c.num_hosts > 1:
        fstype = storage.local_fs_type(c.output_path)
        if fstype.startswith("fuse"):
            log.warning("OUTPUT_PATH %s is on a FUSE file system (%s): its exclusive creates and locks hold only "
                        "within this machine, so several hosts may store a chunk twice; give the hosts gs:// "
                        "directly (see README: where the guarantees stop)", c.output_path, fstype)
    return jobfile.prepare(c.output_path, c.fingerprint(), c.dataset_path, c.chunk_size, c.seed, c.limit,
                           columns=builder_columns, extend=c.extend, owner=owner_id(c),
                           extra={"layout": chunk_object.job_layout(c)}, adopt=adopt,
                           repin_after_s=None if adopt else c.lease_ttl_s)


def run(c: JobConfig, engine=None, tokenizer=None) -> Summary:
    """Run this host's share of the job to completion. Pass an engine to reuse one (tests, API)."""
    t0 = time.time()
    if engine is None:
        check_caches(c)
    storage.configure(deadline_s=c.storage_deadline_s)
    checked_tok = preflight.check(c, engine is not None, tokenizer is not None)  # refused before the pin
    plan = prepare(c, input_columns(c))
    done = naming.finished_chunk_names(c.output_path)
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
        from kdgen.engines.factory import make_engine

        with _sigterm_takes_the_children():
            engine = make_engine(c)
    engine.set_sampling(c)
    current = [engine]  # the engine in use; in-process restarts replace it
    try:
        jobfile.mark_started(c.output_path, c.fingerprint(), owner_id(c), c.lease_ttl_s)
        tok = tokenizer or checked_tok
        wrap = _same
        if c.task == "score":
            from kdgen.score import ScoreBuilder, ScoringEngine

            builder = ScoreBuilder(c, tok, engine.max_model_len)
            wrap = functools.partial(ScoringEngine, c=c)
        else:
            builder = PromptBuilder(c, tok, engine.max_model_len)

        def restart():
            from kdgen.engines.factory import make_engine

            try:
                current[-1].close()
            except Exception:  # it is dead already
                pass
            new = make_engine(c)
            new.set_sampling(c)
            current.append(new)
            return wrap(new)

        in_process = own_engine and not c.endpoint  # the in-process engine: restart it after a death
        return _loop(c, wrap(engine), builder, order, summary, t0, restart if in_process else None)
    finally:
        if own_engine:
            current[-1].close()


def check_caches(c: JobConfig) -> None:
    """The caches this job will load from (the compile cache of an in-process engine, the local
    copy of a gs:// model or tokenizer) must be private: a settings error, before _job.json."""
    from kdgen.engines import compile_cache

    if not c.endpoint:
        compile_cache.use_rank_cache()
    if storage.is_remote(c.model_path) or storage.is_remote(c.tokenizer):
        compile_cache.private_dir(compile_cache.kdgen_cache())


def _same(engine):
    return engine


class Preempted(Exception):
    """SIGTERM: the grace period for in-flight requests is over (or nothing was left in flight)."""


def _loop(c, engine, builder, order, summary, t0, restart=None) -> Summary:
    """Run the leased chunks through the engine until the feeder has no more.

    The request pool (kdgen.engines.pool.pump) keeps the engine full from the Schedule (kdgen.worker.schedule);
    `tick` runs between steps: commits, progress, lost leases, periodic partial saves, SIGTERM.
    An engine death restarts the engine in-process (ENGINE_RESTARTS); a stall trips the watchdog.
    """
    claims = claim_store(c)
    heartbeat = Heartbeat(claims)
    stop = threading.Event()
    # Read ahead enough chunks to fill the engine on their own (each holds a renewed lease).
    target = in_flight_target(c, engine)
    chunks_q: queue.Queue = queue.Queue(maxsize=max(2, -(-target // c.chunk_size) + 1))
    feeder = Feeder(c, order, builder, claims, heartbeat, chunks_q, stop)
    saver = partial.Saver()
    committer = Committer(c, claims, heartbeat, summary)
    committer.unk_id = getattr(getattr(builder, "tok", None), "unk_token_id", None)
    sched = Schedule(c, chunks_q, feeder, summary, saver, claims, heartbeat, committer.submit, owner_id(c),
                     isolate=not c.endpoint)
    committer.rescue = lambda work: sched.save(work, sync=True)
    # The tail (kdgen.worker.feeder): backup copies start when this engine has nothing of its own left.
    feeder.engine_idle = lambda: not sched.in_flight and chunks_q.empty()
    feeder.busy = lambda name: name in sched.in_flight or any(
        w is not None and w.chunk.name == name for w in list(chunks_q.queue))
    feeder.on_stored_elsewhere = sched.note_stored_elsewhere
    pool = RequestPool(engine, target)
    progress = Progress(c, summary, sum(ch.num_rows for ch in order))
    signals = _Signals(stop)
    watchdog = _Watchdog(pool, c.stall_timeout_s, lambda stalled_s: _stalled(c, pool, sched, heartbeat, stalled_s))
    lost_reported: set[str] = set()
    state = {"checkpoint": time.monotonic(), "deadline": None, "restarts": 0}

    def tick() -> None:
        committer.check()
        sched.drop_stored(pool)
        progress.maybe_log()
        for name in heartbeat.lost() - lost_reported:
            lost_reported.add(name)
            chunk = feeder.chunks.get(name)
            if chunk is not None and storage.exists(naming.output_url(c.output_path, chunk, c.output_file_format)):
                # A backup copy was stored (its host deleted our claim, kdgen.worker.feeder): stop here. The
                # feeder sees this sooner from its _claims listings once its walk reaches phase 2.
                sched.note_stored_elsewhere(name)
                continue
            log.warning("lease on %s was taken over by another host (a late heartbeat); finishing it "
                        "anyway: the first copy stored is kept, the other dropped", name)
        now = time.monotonic()
        if c.checkpoint_every_s and now - state["checkpoint"] >= c.checkpoint_every_s / 4:
            state["checkpoint"] = now
            sched.checkpoint(c.checkpoint_every_s)  # each chunk on its own schedule
        if stop.is_set():
            if state["deadline"] is None:  # SIGTERM: let what is in flight finish for most of the grace
                sched.close(graceful=True)
                state["committed_before_signal"] = summary.chunks_committed + sum(not f.done() for f in committer.futures)
                state["deadline"] = (signals.at or now) + max(c.preempt_grace_s - _save_reserve(c), 0.0)
                log.warning("signal %s: no new requests; letting the %d in flight finish for up to %.0f s, then "
                            "saving finished rows to %s/_partial", signals.name, len(pool),
                            max(state["deadline"] - now, 0), c.output_path)
            if now >= state["deadline"]:
                raise Preempted()

    feeder.start()
    watchdog.start()
    try:
        while True:
            try:
                pump(pool, sched, sched.finished, tick)
                break
            except EngineError as e:
                sched.engine_died(pool.lose_all(), e)
                if restart is None or sched.closing:
                    raise
                pool.lose_all(_restart_engine(c, restart, e, state, stop))
        if sched.closing:
            raise Preempted()
        committer.drain()
    except BaseException as e:
        pool.abort()
        _abandon(c, e, stop, feeder, committer, sched, claims, heartbeat, chunks_q, signals, state)
        if isinstance(e, (EngineError, JobError, Preempted, KeyboardInterrupt)):
            raise JobError(_stop_message(c, e, sched, summary, state)) from e
        raise
    finally:
        watchdog.stop()
        signals.restore()
        stop.set()
        heartbeat.stop()
        saver.close()
    summary.elapsed_s = time.time() - t0
    progress.maybe_log(force=True)
    log.info(summary.line())
    unknown = unknown_token_warning(summary.unknown_prompt_tokens, summary.prompt_tokens)
    if unknown:  # also at the end of the summary line: said loudly once more
        log.warning(unknown.lstrip("; "))
    return summary


def _save_reserve(c: JobConfig) -> float:
    """Seconds of PREEMPT_GRACE_S kept for saving rows and handing leases back."""
    return min(max(2.0, c.preempt_grace_s / 4), c.preempt_grace_s)


def _restart_engine(c: JobConfig, restart, error: EngineError, state: dict, stop: threading.Event):
    """A new engine after a death, with backoff (2 s doubling, at most 60 s); raises the last
    error once ENGINE_RESTARTS restarts are spent (or on SIGTERM meanwhile)."""
    while True:
        if state["restarts"] >= c.engine_restarts:
            raise EngineError(f"{error} (ENGINE_RESTARTS={c.engine_restarts} restarts spent)") from error
        state["restarts"] += 1
        wait_s = min(2.0 * 2 ** (state["restarts"] - 1), 60.0)
        log.warning("%s; restarting the engine in %.0f s (restart %d of ENGINE_RESTARTS=%d)",
                    str(error).splitlines()[0], wait_s, state["restarts"], c.engine_restarts)
        if stop.wait(wait_s):
            raise Preempted()
        try:
            return restart()
        except EngineError as e:
            error = e


def _abandon(c, error, stop, feeder, committer, sched, claims, heartbeat, chunks_q, signals, state) -> None:
    """Stop: keep what was committed, save finished rows of unfinished chunks, hand every lease
    still held back at once (so that other hosts need not wait out their TTL)."""
    stop.set()
    sched.close(graceful=not isinstance(error, EngineError))
    # 1. Join the feeder first (emptying the queue it may be blocked on), so no lease arrives later.
    deadline = time.monotonic() + 10.0
    while feeder.is_alive() and time.monotonic() < deadline:
        _empty(chunks_q)
        feeder.join(timeout=0.1)
    _empty(chunks_q)
    if feeder.is_alive():
        log.warning("the feeder did not stop within 10 s; a lease it takes now expires on its own")
    # 2. Let running commits end: each releases its own lease, also when it fails.
    try:
        committer.drain()
    except Exception as e:
        log.error("a commit failed while stopping: %s", e)
    # 3. Save the finished rows of unfinished chunks for the next holder.
    if signals.at is not None:
        budget = signals.at + c.preempt_grace_s - 1.0 - time.monotonic()
    else:
        budget = 30.0
    state["saved_rows"] = sched.save_all(timeout=budget)
    state["unfinished"] = len([w for w in sched.in_flight.values() if w.started])
    # 4. Release every lease still held; a graceful stop does not count as a failed attempt.
    held = heartbeat.leases()
    for lease in held:
        heartbeat.remove(lease.name)
        claims.release(lease, lease.attempt - 1)
    log.info("stopping: handed back %d leases; %d finished rows of %d unfinished chunks are in %s/_partial",
             len(held), state["saved_rows"], state["unfinished"], c.output_path)


def _empty(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _stop_message(c, e, sched, summary, state) -> str:
    saved = (f"{state.get('unfinished', 0)} unfinished chunks were handed back, their "
             f"{state.get('saved_rows', 0)} finished rows saved to {c.output_path}/_partial for the next holder")
    if isinstance(e, Preempted):
        during = max(summary.chunks_committed - state.get("committed_before_signal", summary.chunks_committed), 0)
        return (f"stopped by a signal: {summary.chunks_committed} chunks committed ({during} completed during the "
                f"PREEMPT_GRACE_S={c.preempt_grace_s:g} s grace period); {saved}")
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted; finished chunks are safe in {c.output_path}; {saved}"
    if isinstance(e, EngineError) and not sched.succeeded and not summary.chunks_committed:
        return (f"the engine failed on every request it was given and none finished: that is the engine or the "
                f"settings (e.g. LOGPROBS, MAX_MODEL_LEN, the model), not the rows; no row was recorded as an "
                f"error: {e}. {saved}")
    return f"{e}. Finished chunks are safe in {c.output_path}; {saved}"


def _stalled(c, pool, sched, heartbeat, stalled_s: float) -> None:
    """The progress watchdog tripped: stop renewing leases, say why in one line, exit 1 at once
    (the engine may never return, so nothing waits for it)."""
    oldest = pool.oldest()
    where = f"{sched.describe(oldest[0])}, sent {oldest[1]:.0f} s ago" if oldest else "none"
    reason = (f"no request finished for {stalled_s:.0f} s with {len(pool)} in flight "
              f"(STALL_TIMEOUT_S={c.stall_timeout_s:g}); oldest request: {where}. Stopped renewing leases: "
              f"other hosts take this host's chunks once they expire")
    try:
        heartbeat.stop()
        log.error(reason)
        sched.record_stall(pool.keys(), f"stalled: {reason}", timeout=10.0)
    except Exception as e:  # the stall itself is what matters
        log.warning("could not record the stall: %s", e)
    finally:
        _kill_children()
        sys.stderr.write(f"kdgen: error: {reason}\n")
        sys.stderr.flush()
        os._exit(1)


@contextlib.contextmanager
def _sigterm_takes_the_children():
    """During the engine start nothing is leased or saved yet, so SIGTERM ends the process as it
    always did (killed by the signal), but first SIGKILLs the engine processes being started:
    left alone they outlive us as orphans holding the accelerator's memory, and the next start on
    this host fails for lack of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        log.warning("SIGTERM during the engine start: stopping its processes and exiting")
        _kill_children()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _kill_children() -> None:
    """SIGKILL this process's children (the engine's processes), however wedged."""
    try:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception as e:  # exiting matters more
        log.warning("could not stop the engine's processes: %s", e)


class _Watchdog(threading.Thread):
    """Calls on_stall(seconds) once if no request finished for timeout_s while some were in flight."""

    def __init__(self, pool: RequestPool, timeout_s: float, on_stall):
        super().__init__(name="kdgen-watchdog", daemon=True)
        self.pool, self.timeout_s, self.on_stall = pool, timeout_s, on_stall
        self._stop = threading.Event()

    def run(self) -> None:
        if self.timeout_s <= 0:
            return
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            stalled = self.pool.stalled_s()
            if stalled >= self.timeout_s:
                self.on_stall(stalled)
                return

    def stop(self) -> None:
        self._stop.set()


class _Signals:
    """SIGTERM sets `stop` and remembers when (the grace period counts from it)."""

    def __init__(self, stop: threading.Event):
        self.at: float | None = None
        self.name = ""
        self.old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM,):
            def handler(signum, frame):
                if self.at is None:
                    self.at, self.name = time.monotonic(), signal.Signals(signum).name
                    log.warning("%s: stopping intake; finishing what is in flight for up to PREEMPT_GRACE_S", self.name)
                stop.set()
            self.old[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)

"""The worker loop: the main thread keeps GEN_BATCH_SIZE requests in the engine (kdgen.engines.pool
over the Schedule), the feeder thread leases and reads chunks ahead of it, a small pool commits
finished ones; between engine steps it reports progress, drops chunks stored elsewhere, saves
partial progress and handles SIGTERM. On any stop it saves finished rows and hands every lease
back. docs/protocol.md#the-worker-loop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from functools import partial as bind

from kdgen import storage
from kdgen.config import JobConfig
from kdgen.engines.base import EngineError
from kdgen.engines.pool import RequestPool, in_flight_target, pump
from kdgen.fleet import partial
from kdgen.fleet.heartbeat import Heartbeat
from kdgen.fleet.leases import claim_store, owner_id
from kdgen.records import naming
from kdgen.views.progress import Progress, unknown_token_warning
from kdgen.worker.commit import Committer
from kdgen.worker.custody import Custodian
from kdgen.worker.feeder import Feeder
from kdgen.worker.handoff import Handoff
from kdgen.worker.saves import PartialSaves
from kdgen.worker.schedule import Schedule
from kdgen.worker.signals import Preempted, Signals, Watchdog, kill_children
from kdgen.worker.summary import Summary

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job stopped; the message says why. Finished chunks in OUTPUT_PATH are kept."""


def save_reserve(c: JobConfig) -> float:
    """Seconds of PREEMPT_GRACE_S kept for saving rows and handing leases back."""
    return min(max(2.0, c.preempt_grace_s / 4), c.preempt_grace_s)


class WorkerLoop:
    """One host's run over its chunk order: build the parts, run them, stop cleanly."""

    def __init__(self, c: JobConfig, engine, builder, order, summary: Summary, restart=None):
        """restart(): a new engine after a death (None: the engine is not restarted)."""
        self.c, self.engine, self.summary, self.restart = c, engine, summary, restart
        self.claims = claim_store(c)
        self.heartbeat = Heartbeat(self.claims)
        self.stop = threading.Event()
        self.saver = partial.Saver()
        self.custodian = Custodian(c.output_path, self.claims, self.heartbeat, self.saver)
        # Read ahead enough chunks to fill the engine on their own (each holds a renewed lease).
        target = in_flight_target(c, engine)
        self.handoff = Handoff(maxsize=max(2, -(-target // c.chunk_size) + 1))
        self.feeder = Feeder(c, order, builder, self.claims, self.custodian, self.handoff, self.stop)
        saves = PartialSaves(c, self.saver)
        self.committer = Committer(c, summary, rescue=bind(saves.save, sync=True),
                                   unk_id=getattr(getattr(builder, "tok", None), "unk_token_id", None))
        self.sched = Schedule(c, self.handoff, self.custodian, summary, saves, self.committer.submit, owner_id(c),
                              isolate=not c.endpoint)
        self.pool = RequestPool(engine, target)
        self.progress = Progress(c, summary, sum(ch.num_rows for ch in order))
        self.signals = Signals(self.stop)
        self.watchdog = Watchdog(self.pool, c.stall_timeout_s, self.stalled)
        self.lost_reported: set[str] = set()
        self.checkpoint_at = time.monotonic()
        self.deadline: float | None = None  # SIGTERM: when the grace for in-flight requests ends
        self.restarts = 0
        self.committed_before_signal: int | None = None
        self.saved_rows = self.unfinished = 0

    def run(self, t0: float) -> Summary:
        self.feeder.start()
        self.watchdog.start()
        try:
            self.pump_until_done()
            if self.sched.closing:
                raise Preempted()
            self.committer.drain()
        except BaseException as e:
            self.pool.abort()
            self.abandon(e)
            if isinstance(e, (EngineError, JobError, Preempted, KeyboardInterrupt)):
                raise JobError(self.stop_message(e)) from e
            raise
        finally:
            self.watchdog.stop()
            self.signals.restore()
            self.stop.set()
            self.heartbeat.stop()
            self.saver.close()
        s = self.summary
        s.set_elapsed(time.time() - t0)
        self.progress.maybe_log(force=True)
        log.info(s.line())
        unknown = unknown_token_warning(s.unknown_prompt_tokens, s.prompt_tokens)
        if unknown:  # also at the end of the summary line: said loudly once more
            log.warning(unknown.lstrip("; "))
        return s

    def pump_until_done(self) -> None:
        """Steps the engine until the feeder has no more; an engine death restarts it in-process."""
        while True:
            try:
                pump(self.pool, self.sched, self.sched.finished, self.tick)
                return
            except EngineError as e:
                self.sched.engine_died(self.pool.lose_all(), e)
                if self.restart is None or self.sched.closing:
                    raise
                self.pool.lose_all(self.restart_engine(e))

    # ---- between engine steps -------------------------------------------------------------------
    def tick(self) -> None:
        """Commits, progress, lost leases, periodic partial saves, SIGTERM."""
        c = self.c
        self.committer.check()
        self.sched.drop_stored(self.pool)
        self.progress.maybe_log()
        self.note_lost_leases()
        now = time.monotonic()
        if c.checkpoint_every_s and now - self.checkpoint_at >= c.checkpoint_every_s / 4:
            self.checkpoint_at = now
            self.sched.checkpoint(c.checkpoint_every_s)  # each chunk on its own schedule
        if self.stop.is_set():
            if self.deadline is None:  # SIGTERM: let what is in flight finish for most of the grace
                self.sched.close(graceful=True)
                self.committed_before_signal = self.summary.chunks_committed + self.committer.pending()
                self.deadline = (self.signals.at or now) + max(c.preempt_grace_s - save_reserve(c), 0.0)
                log.warning("signal %s: no new requests; letting the %d in flight finish for up to %.0f s, then "
                            "saving finished rows to %s/_partial", self.signals.name, len(self.pool),
                            max(self.deadline - now, 0), c.output_path)
            if now >= self.deadline:
                raise Preempted()

    def note_lost_leases(self) -> None:
        for name in self.heartbeat.lost() - self.lost_reported:
            self.lost_reported.add(name)
            chunk = self.feeder.chunks.get(name)
            if chunk is not None and storage.exists(naming.output_url(self.c.output_path, chunk,
                                                                      self.c.output_file_format)):
                # A backup copy was stored (its host deleted our claim, kdgen.worker.feeder): stop here. The
                # feeder sees this sooner from its _claims listings once its walk reaches phase 2.
                self.custodian.report_stored(name)
                continue
            log.warning("lease on %s was taken over by another host (a late heartbeat); finishing it "
                        "anyway: the first copy stored is kept, the other dropped", name)

    def restart_engine(self, error: EngineError):
        """A new engine after a death, with backoff (2 s doubling, at most 60 s); raises the last
        error once ENGINE_RESTARTS restarts are spent (or on SIGTERM meanwhile)."""
        c = self.c
        while True:
            if self.restarts >= c.engine_restarts:
                raise EngineError(f"{error} (ENGINE_RESTARTS={c.engine_restarts} restarts spent)") from error
            self.restarts += 1
            wait_s = min(2.0 * 2 ** (self.restarts - 1), 60.0)
            log.warning("%s; restarting the engine in %.0f s (restart %d of ENGINE_RESTARTS=%d)",
                        str(error).splitlines()[0], wait_s, self.restarts, c.engine_restarts)
            if self.stop.wait(wait_s):
                raise Preempted()
            try:
                return self.restart()
            except EngineError as e:
                error = e

    # ---- stopping -------------------------------------------------------------------------------
    def abandon(self, error: BaseException) -> None:
        """Stop: keep what was committed, save finished rows of unfinished chunks, hand every lease
        still held back at once (so that other hosts need not wait out their TTL)."""
        c = self.c
        self.stop.set()
        self.sched.close(graceful=not isinstance(error, EngineError))
        # 1. Join the feeder first (emptying the queue it may be blocked on), so no lease arrives later.
        deadline = time.monotonic() + 10.0
        while self.feeder.is_alive() and time.monotonic() < deadline:
            self.handoff.drain()
            self.feeder.join(timeout=0.1)
        self.handoff.drain()
        if self.feeder.is_alive():
            log.warning("the feeder did not stop within 10 s; a lease it takes now expires on its own")
        # 2. Let running commits end: each ends its own chunk's custody, also when it fails.
        try:
            self.committer.drain()
        except Exception as e:
            log.error("a commit failed while stopping: %s", e)
        # 3. Save the finished rows of unfinished chunks for the next holder.
        if self.signals.at is not None:
            budget = self.signals.at + c.preempt_grace_s - 1.0 - time.monotonic()
        else:
            budget = 30.0
        self.saved_rows = self.sched.save_all(timeout=budget)
        self.unfinished = len([w for w in self.sched.in_flight.values() if w.started])
        # 4. Hand back every lease still held; a graceful stop does not count as a failed attempt.
        handed = self.custodian.hand_back_all()
        log.info("stopping: handed back %d leases; %d finished rows of %d unfinished chunks are in %s/_partial",
                 handed, self.saved_rows, self.unfinished, c.output_path)

    def stop_message(self, e: BaseException) -> str:
        c, summary = self.c, self.summary
        saved = (f"{self.unfinished} unfinished chunks were handed back, their "
                 f"{self.saved_rows} finished rows saved to {c.output_path}/_partial for the next holder")
        if isinstance(e, Preempted):
            before = self.committed_before_signal
            during = max(summary.chunks_committed - (summary.chunks_committed if before is None else before), 0)
            return (f"stopped by a signal: {summary.chunks_committed} chunks committed ({during} completed during the "
                    f"PREEMPT_GRACE_S={c.preempt_grace_s:g} s grace period); {saved}")
        if isinstance(e, KeyboardInterrupt):
            return f"interrupted; finished chunks are safe in {c.output_path}; {saved}"
        if isinstance(e, EngineError) and not self.sched.succeeded and not summary.chunks_committed:
            return (f"the engine failed on every request it was given and none finished: that is the engine or the "
                    f"settings (e.g. LOGPROBS, MAX_MODEL_LEN, the model), not the rows; no row was recorded as an "
                    f"error: {e}. {saved}")
        return f"{e}. Finished chunks are safe in {c.output_path}; {saved}"

    def stalled(self, stalled_s: float) -> None:
        """The progress watchdog tripped: stop renewing leases, say why in one line, exit 1 at once
        (the engine may never return, so nothing waits for it)."""
        pool = self.pool
        oldest = pool.oldest()
        where = f"{self.sched.describe(oldest[0])}, sent {oldest[1]:.0f} s ago" if oldest else "none"
        reason = (f"no request finished for {stalled_s:.0f} s with {len(pool)} in flight "
                  f"(STALL_TIMEOUT_S={self.c.stall_timeout_s:g}); oldest request: {where}. Stopped renewing leases: "
                  f"other hosts take this host's chunks once they expire")
        try:
            self.heartbeat.stop()
            log.error(reason)
            self.sched.record_stall(pool.keys(), f"stalled: {reason}", timeout=10.0)
        except Exception as e:  # the stall itself is what matters
            log.warning("could not record the stall: %s", e)
        finally:
            kill_children()
            sys.stderr.write(f"kdgen: error: {reason}\n")
            sys.stderr.flush()
            os._exit(1)

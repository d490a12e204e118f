"""The chunks a worker holds: which of their rows still need the engine, in what order, and what
an engine death does to them. kdgen.worker.runner drives it; kdgen.engines.pool runs its requests.

When the worker loop takes up a chunk the feeder leased (`Schedule.take`), rows that an earlier
holder saved (kdgen.fleet.partial) are reused and the others are queued, normally all together in the
shared request pool. When the engine dies, the rows it had in flight are recorded in the chunk's
history and queued again, and the chunk's attempt number (in its lease) goes up. Once a chunk's
attempts exceed MAX_CHUNK_ATTEMPTS (in-process engine only), its unfinished rows that were in
flight at deaths run ALONE in the engine, in groups that shrink with every death down to single
rows; a row that kills the engine while alone in it becomes an error record (its quarantine; see
kdgen.fleet.partial for the exact rule). Finished rows are saved as partial segments every
CHECKPOINT_EVERY_S, after every death, and when the worker stops.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from kdgen.fleet import partial
from kdgen.records import builders
from kdgen.fleet.leases import Lease
from kdgen.corpus.dataset import Chunk
from kdgen.engines.base import Finished, Request
from kdgen.engines.pool import request_seed
from kdgen.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity semantics: works are dict keys and deque members
class ChunkWork:
    chunk: Chunk
    lease: Lease | None
    prompts: list[Prompt]
    results: dict[int, Finished] = field(default_factory=dict)  # prompt index -> fresh result
    cached: dict[int, partial.Row] = field(default_factory=dict)  # prompt index -> row saved earlier
    pending: collections.deque = field(default_factory=collections.deque)  # prompt indices to send
    groups: list[list[int]] = field(default_factory=list)  # isolation: prompt indices to run alone
    outstanding: int = 0  # requests in the engine
    started: bool = False  # taken up by the loop (partial progress read, rows queued)
    isolating: bool = False
    quarantined: dict[int, str] = field(default_factory=dict)  # row_idx -> error record text
    history: partial.History = field(default_factory=partial.History)
    segments: partial.Segments | None = None
    unsaved: list[int] = field(default_factory=list)  # prompt indices finished since the last segment
    touched_partials: bool = False  # segments exist for this chunk: delete them after the commit
    saves: list[Future] = field(default_factory=list)  # segment writes under way
    saved_at: float = 0.0  # time.monotonic() of the take-up or the last segment (periodic saves count from it)
    backup: bool = False  # a copy of a chunk another host holds (kdgen.worker.feeder: the tail); no lease, no segments
    dropped: bool = False  # stored by another host meanwhile: its requests were aborted

    def wait_saves(self, timeout: float = 60.0) -> None:
        """Let segment writes under way land (before the segments are deleted after a commit)."""
        wait(self.saves, timeout=timeout)
        self.saves = []

    @property
    def attempt(self) -> int:
        return self.lease.attempt if self.lease is not None else 1

    @property
    def complete(self) -> bool:
        return self.started and not self.pending and not self.groups and self.outstanding == 0

    def unfinished(self) -> list[int]:
        return list(self.pending) + [i for g in self.groups for i in g]

    def note(self, event: dict) -> None:
        self.history.add(event)
        if self.segments is not None:
            self.segments.pending_events.append(event)


class Schedule:
    """The request source of the worker loop (kdgen.engines.pool.Source) over the chunks in flight."""

    def __init__(self, c, chunks_q: queue.Queue, feeder, summary, saver: partial.Saver, claims, heartbeat,
                 commit, owner: str, isolate: bool):
        self.c, self.q, self.feeder, self.summary, self.saver = c, chunks_q, feeder, summary, saver
        self.claims, self.heartbeat, self.commit, self.owner, self.isolate = claims, heartbeat, commit, owner, isolate
        self.fingerprint = c.fingerprint_hash()
        self.feeding: collections.deque[ChunkWork] = collections.deque()  # works with rows left to send
        self.in_flight: dict[str, ChunkWork] = {}  # chunk name -> work, until handed to the committer
        self.feeder_done = False
        self.closing = False  # stopping: hand out nothing more
        self.alone: tuple[ChunkWork, str, set[int]] | None = None  # isolation group in the engine
        self.stored_elsewhere: set[str] = set()  # held here, stored by another host: dropped
        self._stored_new: set[str] = set()  # reported by the feeder, not yet dropped
        self._stored_lock = threading.Lock()
        self.succeeded = 0  # requests finished without error by this process's engines

    # ---- pool.Source ----------------------------------------------------------------------------
    def take(self, room: int, idle: bool) -> list[Request] | None:
        if self.closing:
            return None
        if self.alone is not None:
            return []  # an isolation group runs alone
        out: list[Request] = []
        while len(out) < room:
            if not self.feeding and self._next_work(block=idle and not out) is None:
                break
            work = self.feeding[0]
            while work.pending and len(out) < room:
                out.append(self._request(work, work.pending.popleft()))
            if work.pending:
                break
            if work.groups:
                if out or not idle:
                    break  # wait until the engine is empty, then run the group alone
                return self._run_alone(work, work.groups.pop(0))
            self.feeding.popleft()
            self._commit_if_complete(work)  # every row was cached or an error
        if not out and self.feeder_done and not self.feeding:
            return None
        return out

    def _next_work(self, block: bool) -> ChunkWork | None:
        if self.feeder_done:
            return None
        try:
            work = self.q.get(timeout=1.0) if block else self.q.get_nowait()
        except queue.Empty:
            self.feeder.feed_me()
            return None
        if work is None:
            self.feeder_done = True
            if self.feeder.error:
                raise self.feeder.error
            return None
        if work.chunk.name in self.stored_elsewhere:  # dropped while it was queued
            self._release_dropped(work)
            return None
        self.in_flight[work.chunk.name] = work
        self.start(work)
        if work.dropped:  # a backup copy not worth making
            del self.in_flight[work.chunk.name]
            self._wake_feeder()
            return None
        self.feeding.append(work)
        return work

    def _request(self, work: ChunkWork, i: int) -> Request:
        work.outstanding += 1
        p = work.prompts[i]
        return Request((work, i), p.token_ids, p.max_tokens, p.messages,
                       seed=request_seed(self.c.seed, work.chunk.stem, p.row_idx))

    def _run_alone(self, work: ChunkWork, group: list[int]) -> list[Request]:
        rows = [work.prompts[i].row_idx for i in group]
        intent = f"{work.segments.take}-{work.segments.seq}"
        work.note({"intent": intent, "rows": rows, "proof": finished_rows(work)})
        self.save(work, sync=True)  # written before the group runs: a vanished process still counts
        log.info("%s (attempt %d): running rows %s alone in the engine", work.chunk.name, work.attempt, rows)
        self.alone = (work, intent, set(group))
        return [self._request(work, i) for i in group]

    # ---- taking a chunk up ----------------------------------------------------------------------
    def start(self, work: ChunkWork) -> None:
        """Reuse the rows an earlier holder saved, quarantine proven poison, queue the rest."""
        c = self.c
        try:
            if work.lease is not None and work.lease.fresh:  # no earlier holder: nothing saved (a listing saved)
                cached = partial.Cached({}, partial.History())
            else:
                cached = partial.load(c.output_path, self.fingerprint, work.chunk, work.prompts)
        except Exception as e:  # listing failed: a cache miss costs time only
            log.warning("could not read the partial progress of %s: %s", work.chunk.name, e)
            cached = partial.Cached({}, partial.History())
        work.history = cached.history
        work.touched_partials = cached.segments > 0
        if work.backup and cached.history.deaths():
            log.info("%s: not copying it: an engine died on it (a poison row would kill this engine too)",
                     work.chunk.name)
            work.dropped = work.started = True
            return
        work.segments = partial.Segments(c.output_path, self.fingerprint, work.chunk.name, self.owner)
        poison = cached.history.quarantine()
        todo = []
        for i, p in enumerate(work.prompts):
            if p.error is not None:
                continue
            row = cached.rows.get(p.row_idx)
            if row is not None:
                work.cached[i] = row
            elif p.row_idx in poison and self.isolate:
                self.quarantine(work, i, poison[p.row_idx])
            else:
                todo.append(i)
        if work.cached:
            log.info("%s: reusing %d finished rows saved by an earlier holder; %d rows left to generate",
                     work.chunk.name, len(work.cached), len(todo))
        work.isolating = self.isolate and work.attempt > c.max_chunk_attempts
        if work.isolating:
            log.warning("%s: attempt %d > MAX_CHUNK_ATTEMPTS=%d: running its suspect rows alone in the engine",
                        work.chunk.name, work.attempt, c.max_chunk_attempts)
        self.schedule(work, todo)
        work.started, work.saved_at = True, time.monotonic()
        if work.backup:  # a copy writes no segments (its holder's cleanup could miss them)
            work.segments = None

    def schedule(self, work: ChunkWork, todo: list[int]) -> None:
        """Queue prompt indices `todo` (replacing what was queued): all in the shared pool, or,
        when isolating, the suspects in groups to run alone."""
        work.pending.clear()
        work.groups = []
        if not work.isolating:
            work.pending.extend(sorted(todo))
            return
        deaths = work.history.deaths()
        index = {work.prompts[i].row_idx: i for i in todo}
        suspects = [r for r in index if deaths.get(r, 0) >= 1]
        if not suspects:  # no death of these rows was recorded (the whole process died): all are suspect
            suspects, deaths = list(index), {r: 1 for r in index}
        work.pending.extend(sorted(index[r] for r in index if r not in set(suspects)))
        last = work.history.unproven()
        work.groups = [[index[r] for r in g] for g in partial.groups(suspects, deaths, last)]

    def quarantine(self, work: ChunkWork, i: int, text: str) -> None:
        p = work.prompts[i]
        p.error, p.error_kind = text, "quarantined"
        work.quarantined[p.row_idx] = text
        work.unsaved.append(i)
        log.error("%s row %d: %s; it becomes an error record", work.chunk.name, p.row_idx, text)

    # ---- results and deaths ---------------------------------------------------------------------
    def finished(self, key, f: Finished) -> None:
        work, i = key
        work.results[i] = f
        self.succeeded += f.error is None
        work.outstanding -= 1
        work.unsaved.append(i)
        self.summary.generated_tokens += sum(len(s.token_ids) for s in f.samples)
        if self.alone is not None and self.alone[0] is work:
            self.alone[2].discard(i)
            if not self.alone[2]:
                self.alone = None
                self.save(work)  # the group survived: keep its rows at once
        self._commit_if_complete(work)

    def _commit_if_complete(self, work: ChunkWork) -> None:
        if work.complete and self.in_flight.get(work.chunk.name) is work:
            del self.in_flight[work.chunk.name]
            self.commit(work)
            self._wake_feeder()

    def _wake_feeder(self) -> None:
        if not self.in_flight:  # the engine runs dry: a waiting feeder may start a backup copy
            self.feeder.wake.set()

    # ---- a chunk stored by another host (a backup copy won) ---------------------------------------
    def note_stored_elsewhere(self, name: str) -> None:
        """From the feeder's thread: `name`, which this host holds or copies, was stored by another host."""
        with self._stored_lock:
            self._stored_new.add(name)

    def drop_stored(self, pool) -> None:
        """Between engine steps: stop working on the chunks stored elsewhere (abort their requests,
        forget their leases); a chunk still queued is dropped when taken up."""
        with self._stored_lock:
            names, self._stored_new = self._stored_new, set()
        for name in names:
            self.stored_elsewhere.add(name)
            work = self.in_flight.get(name)
            if work is None:
                continue
            del self.in_flight[name]
            work.dropped = True
            aborted = pool.abort_keys(lambda key, work=work: key[0] is work)
            work.pending.clear()
            work.groups, work.outstanding = [], 0
            if work in self.feeding:
                self.feeding.remove(work)
            if self.alone is not None and self.alone[0] is work:
                self.alone = None
            log.info("%s was stored by another host (%s): dropped it here (%d requests aborted, %d rows finished "
                     "in vain)", name, "its holder or another copy" if work.backup else "a backup copy", aborted,
                     len(work.results))
            self._release_dropped(work)
            self._wake_feeder()  # only on a change: a wake on every idle tick would make it poll

    def _release_dropped(self, work: ChunkWork) -> None:
        self.summary.chunks_lost_race += 1
        if work.lease is not None:
            self.heartbeat.remove(work.chunk.name)
            self.claims.release(work.lease, committed=True)
        if work.touched_partials:  # its segments, written before or after the copy's commit
            def cleanup(work=work):
                work.wait_saves()
                try:
                    partial.cleanup(self.c.output_path, work.chunk.name)
                except Exception as e:  # litter in _partial costs nothing but a listing
                    log.warning("could not delete the partial progress of %s: %s", work.chunk.name, e)
            self.saver.submit(cleanup)

    def engine_died(self, lost: list, error: BaseException) -> None:
        """The engine died with `lost` (keys) in flight: record it, count the attempt, queue again."""
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        by_work: dict[ChunkWork, list[int]] = {}
        for work, i in lost:
            by_work.setdefault(work, []).append(i)
        alone, self.alone = self.alone, None
        for work, idxs in by_work.items():
            work.outstanding -= len(idxs)
            rows = [work.prompts[i].row_idx for i in idxs]
            intent = alone[1] if alone is not None and alone[0] is work else None
            solo = intent is not None and len(lost) == 1
            proof = finished_rows(work)
            work.note({"died": rows, "alone": solo, "intent": intent, "reason": reason, "proof": proof})
            if solo and self.isolate and proof:
                self.quarantine(work, idxs[0], work.history.quarantine()[rows[0]])
                idxs = []
            elif solo and self.isolate:
                log.warning("%s row %d killed the engine alone, but no row of its chunk has finished yet: the engine "
                            "or the settings may be at fault; running it again after the others", work.chunk.name,
                            rows[0])
            self.count_attempt(work)
            if work.isolating:
                self.schedule(work, work.unfinished() + idxs)
            else:
                work.pending.extendleft(reversed(idxs))
            if work not in self.feeding:
                self.feeding.appendleft(work)
            self.save(work)
            self._commit_if_complete(work)

    def count_attempt(self, work: ChunkWork) -> None:
        """The engine died on this chunk: its lease records the next attempt number."""
        lease = work.lease
        if lease is None:
            return
        self.heartbeat.remove(lease.name)
        lease.attempt += 1
        try:
            ok = self.claims.renew(lease)
        except Exception as e:  # transient: the next heartbeat writes it
            log.warning("could not record attempt %d on %s: %s", lease.attempt, lease.name, e)
            ok = True
        if ok:
            self.heartbeat.add(lease)
        else:
            log.warning("lost the lease on %s while recording attempt %d", lease.name, lease.attempt)
        if self.isolate and not work.isolating and lease.attempt > self.c.max_chunk_attempts:
            work.isolating = True
            log.warning("%s: attempt %d > MAX_CHUNK_ATTEMPTS=%d: running its suspect rows alone in the engine",
                        work.chunk.name, lease.attempt, self.c.max_chunk_attempts)

    # ---- partial progress -----------------------------------------------------------------------
    def save(self, work: ChunkWork, sync: bool = False) -> Future | None:
        """Write a segment with the rows (and events) of `work` since its last one."""
        if work.segments is None or work.dropped or (work.lease is not None and work.chunk.name in self.heartbeat.lost()):
            return None  # not started (or a backup copy), dropped, or another host holds it now
        items = [(work.prompts[i], work.results.get(i)) for i in work.unsaved]
        if not items and not work.segments.pending_events:
            return None
        work.unsaved, work.saved_at = [], time.monotonic()
        url, head = work.segments.next(work.attempt)
        work.touched_partials = True
        c, chunk = self.c, work.chunk

        def write() -> bool:
            rows = [row_of(c, chunk, p, f) for p, f in items]
            return partial.write_segment(url, head, rows, chunk.name)

        fut = self.saver.submit(write)
        work.saves = [f for f in work.saves if not f.done()] + [fut]
        if sync:
            fut.result()
        return fut

    def checkpoint(self, every_s: float) -> None:
        """Save the rows of each chunk taken up (or last saved) every_s ago or earlier. Per chunk,
        not all at once: a chunk that is stored within every_s of its take-up costs no segment
        (nor their listing and deletion after the commit), and a kill -9 still loses at most
        about every_s of any chunk's work."""
        now = time.monotonic()
        for work in list(self.in_flight.values()):
            if work.started and work.unsaved and now - work.saved_at >= every_s:
                self.save(work)

    def save_all(self, timeout: float) -> int:
        """Save every unfinished chunk's rows; the number of its finished rows now in _partial."""
        futures, rows = [], 0
        for work in list(self.in_flight.values()):
            if not work.started:
                continue
            rows += len(work.results) + len(work.cached) + len(work.quarantined)
            f = self.save(work)
            if f is not None:
                futures.append(f)
        done, not_done = wait(futures, timeout=max(timeout, 0.1))
        if not_done:
            log.warning("%d partial saves did not finish in time", len(not_done))
        return rows

    def close(self, graceful: bool) -> None:
        """Hand out nothing more; an isolation group cut short by a graceful stop did not fail."""
        self.closing = True
        if self.alone is not None and graceful:
            work, intent, _ = self.alone
            work.note({"cancel": intent})
        self.alone = None

    def record_stall(self, keys: list, reason: str, timeout: float) -> None:
        """The stall watchdog: count the rows in flight as died (from the watchdog's thread)."""
        by_work: dict[ChunkWork, list[int]] = {}
        for work, i in keys:
            by_work.setdefault(work, []).append(i)
        alone = self.alone
        futures = []
        for work, idxs in by_work.items():
            rows = [work.prompts[i].row_idx for i in idxs]
            intent = alone[1] if alone is not None and alone[0] is work else None
            work.note({"died": rows, "alone": intent is not None and len(keys) == 1, "intent": intent,
                       "reason": reason})
            f = self.save(work)
            if f is not None:
                futures.append(f)
        wait(futures, timeout=timeout)

    def describe(self, key) -> str:
        work, i = key
        return f"row {work.prompts[i].row_idx} of {work.chunk.name}"


def finished_rows(work: ChunkWork) -> int:
    """Rows of the chunk with a result (fresh, or saved by an earlier holder): the proof, when a
    row then dies alone, that the engine and the settings work and the row is at fault."""
    fresh = sum(f.error is None for f in work.results.values())
    return fresh + sum(r.error is None for r in work.cached.values())


def row_of(c, chunk: Chunk, p: Prompt, f: Finished | None) -> partial.Row:
    """A finished row as the chunk object will hold it (records in the job's format)."""
    h = partial.prompt_hash(p)
    if f is None or f.error is not None:  # quarantined, or refused by an endpoint (4xx)
        return partial.Row(p.row_idx, h, [], p.error if f is None else f.error)
    gen = sum(len(s.token_ids) for s in f.samples)
    return partial.Row(p.row_idx, h, builders.records(c, chunk, p, f), None, len(f.samples), gen, len(p.token_ids))

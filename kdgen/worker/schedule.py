"""The chunks a worker feeds its engine: which of their rows still need the engine, in what order,
and what an engine death does to them. kdgen.worker.loop drives it; kdgen.engines.pool runs its
requests. Rows an earlier holder saved are reused; rows in flight at an engine death are queued
again and the chunk's attempt counts on; past MAX_CHUNK_ATTEMPTS (in-process engine only) its
suspect rows run ALONE in the engine, in groups that shrink with every death, and a row that kills
the engine alone becomes an error record. docs/protocol.md#attempts-and-quarantine.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from typing import Callable

from kdgen.engines.base import Finished, Request
from kdgen.engines.pool import request_seed
from kdgen.fleet import partial
from kdgen.worker.custody import Custodian
from kdgen.worker.handoff import Handoff
from kdgen.worker.saves import PartialSaves
from kdgen.worker.summary import Summary
from kdgen.worker.work import ChunkWork, finished_rows

log = logging.getLogger(__name__)


class Schedule:
    """The request source of the worker loop (kdgen.engines.pool.Source) over the chunks in flight."""

    def __init__(self, c, handoff: Handoff, custodian: Custodian, summary: Summary, saves: PartialSaves,
                 commit: Callable[[ChunkWork], None], owner: str, isolate: bool):
        """handoff: the chunks the feeder leased; custodian: their custody; saves: partial segments;
        commit(work): hands a complete chunk to the committer; isolate: run suspect rows alone."""
        self.c, self.handoff, self.custodian, self.summary, self.saves = c, handoff, custodian, summary, saves
        self.commit, self.owner, self.isolate = commit, owner, isolate
        self.fingerprint = c.fingerprint_hash()
        self.feeding: collections.deque[ChunkWork] = collections.deque()  # works with rows left to send
        self.in_flight: dict[str, ChunkWork] = {}  # chunk name -> work, until handed to the committer
        self.feeder_done = False
        self.closing = False  # stopping: hand out nothing more
        self.alone: tuple[ChunkWork, str, set[int]] | None = None  # isolation group in the engine
        self.stored_elsewhere: set[str] = set()  # held here, stored by another host: dropped
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
            work = self.handoff.get(timeout=1.0) if block else self.handoff.get_nowait()
        except queue.Empty:
            self.handoff.feed_me()
            return None
        if work is None:
            self.feeder_done = True
            if self.handoff.error:
                raise self.handoff.error
            return None
        if work.chunk.name in self.stored_elsewhere:  # dropped while it was queued
            self._release_dropped(work)
            return None
        self.in_flight[work.chunk.name] = work
        self.start(work)
        if work.dropped:  # a backup copy not worth making
            del self.in_flight[work.chunk.name]
            work.custody.hand_back()  # nothing to hand back but the copy itself: no lease, no segments
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
        self.saves.save(work, sync=True)  # written before the group runs: a vanished process still counts
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
        work.custody.partials = cached.segments > 0
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
        work.custody.start_feeding()
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
        self.summary.add_generated(sum(len(s.token_ids) for s in f.samples))
        if self.alone is not None and self.alone[0] is work:
            self.alone[2].discard(i)
            if not self.alone[2]:
                self.alone = None
                self.saves.save(work)  # the group survived: keep its rows at once
        self._commit_if_complete(work)

    def _commit_if_complete(self, work: ChunkWork) -> None:
        if work.complete and self.in_flight.get(work.chunk.name) is work:
            del self.in_flight[work.chunk.name]
            work.custody.complete()
            self.commit(work)
            self._wake_feeder()

    def _wake_feeder(self) -> None:
        if not self.in_flight:  # the engine runs dry: a waiting feeder may start a backup copy
            self.handoff.engine_ran_dry()

    # ---- a chunk stored by another host (a backup copy won) ---------------------------------------
    def drop_stored(self, pool) -> None:
        """Between engine steps: stop working on the chunks stored elsewhere (reported to the
        custodian: abort their requests, forget their leases); a chunk still queued is dropped when
        taken up."""
        for name in self.custodian.stored_reports():
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
        self.summary.add_lost_race()
        work.custody.drop()

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
            self.saves.save(work)
            self._commit_if_complete(work)

    def count_attempt(self, work: ChunkWork) -> None:
        """The engine died on this chunk: its custody counts the attempt; past the budget its
        suspect rows run alone."""
        if work.lease is None:
            return
        attempt = work.custody.count_attempt()
        if self.isolate and not work.isolating and attempt > self.c.max_chunk_attempts:
            work.isolating = True
            log.warning("%s: attempt %d > MAX_CHUNK_ATTEMPTS=%d: running its suspect rows alone in the engine",
                        work.chunk.name, attempt, self.c.max_chunk_attempts)

    # ---- partial progress -----------------------------------------------------------------------
    def checkpoint(self, every_s: float) -> None:
        """Periodic saves, each chunk on its own schedule (PartialSaves.due)."""
        self.saves.due(list(self.in_flight.values()), every_s)

    def save_all(self, timeout: float) -> int:
        """Save every unfinished chunk's rows; the number of its finished rows now in _partial."""
        return self.saves.save_all(list(self.in_flight.values()), timeout)

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
            f = self.saves.save(work)
            if f is not None:
                futures.append(f)
        self.saves.wait(futures, timeout)

    def describe(self, key) -> str:
        work, i = key
        return f"row {work.prompts[i].row_idx} of {work.chunk.name}"



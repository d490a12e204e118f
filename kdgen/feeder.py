"""The feeder: which chunk this host generates next, read ahead of the engine, at a storage cost
that grows with the chunks, not with hosts x chunks.

Every host walks its own rotation of the shared plan (dataset.host_order: hosts start at evenly
spaced offsets), in three phases. Requests below are to OUT on GCS (30-50 ms each there).

1. Its own share, in order. The listing of OUT made at start (runner.run) already dropped the
   chunks finished before; for each chunk the feeder takes the lease (create-if-absent: 1),
   checks again that the chunk object is still absent (1: a holder may have committed and
   released between the listing and our take) and queues the rows; the committer then creates
   the chunk object (1) and deletes the lease (1), and the heartbeat renews each held lease every
   ttl/3 after its last write (one renewal per ttl/3 a chunk is held: queued, then generated).
   So 4 per chunk, plus renewals. The worker loop adds nothing for a chunk whose lease was
   created fresh (no earlier holder can have saved rows of it); a chunk with an earlier holder
   costs a listing of its OUT/_partial folder, and a chunk in flight for CHECKPOINT_EVERY_S a
   segment write (then a listing and deletes after its commit): kdgen/partial.py.
   The feeder takes a lease only when the queue has room for it and keeps no more chunks queued
   than the engine needs besides the one it is fed from (ceil(in-flight target / chunk size) - 1,
   at least 1): leases are not hoarded, and each is renewed about as often as its own generation
   time requires.
2. The rest, from listings. Phase 1 ends at the first sign that the walk reached other hosts'
   work (a chunk found finished after taking it, or three chunks in a row leased by others) or
   at the end of its order. From then on the feeder learns what is finished from one listing of
   OUT (1 request per 1,000 objects, not 1 per chunk) and what is leased from a listing of
   _claims (live leases only: finished chunks delete theirs, so it is a page or two), made
   before every pick. It picks among the chunks neither finished nor leased in an order of its
   own (a permutation seeded by its host index), so hosts that run out of work at the same time
   spread over what is left instead of all contending for the same next chunk; a pick another
   host took since the listing costs one failed create. The OUT listing is made again only when
   it has proven stale: after max(3, pages/3) picks that turned out finished (3 requests each),
   so stale knowledge costs about what a listing costs, never more.
3. Waiting. When every remaining chunk is leased by another host, the feeder lists _claims every
   poll_s (ttl/40, at most 15 s), doubling the wait while no claim disappears, up to ttl/10 (at
   most 60 s): a fleet waiting out a long tail costs a few listings per host, and a host still
   exits within a minute of the last commit. A claim that disappeared means its chunk was committed (a
   stat, or a listing of OUT when many disappeared at once, confirms it) or handed back (it is
   picked again); a claim seen unchanged for the ttl on this host's clock (claims.py) is taken
   over by compare-and-swap, as before. A claim can also be a released marker (kdgen.claims:
   a chunk handed back unfinished, e.g. on SIGTERM, which keeps its count of failed attempts):
   it is free at once. Markers are padded to claims.RELEASED_MIN_SIZE bytes, so the listing's
   sizes tell which claims may be markers: only those are read (once per generation), and a
   marker is taken by compare-and-swap, counting the attempt on. The walk ends when no chunk is left, within that wait of the
   last commit, so idle hosts exit soon after the job is done and not before.

The tail: backup copies. From phase 2 on, a host takes a lease only when its worker loop asks
for rows it does not have (the engine has room and every row it holds is sent), so the last
chunks spread over the hosts that are free instead of waiting queued behind a slow host's
engine (the engine still has its in-flight target of requests to work on meanwhile). But at the
very end every chunk left is held by some host, and a slow host's last chunks would hold the
whole fleet idle for their time. So, as MapReduce does with its backup tasks, a host whose
engine is idle while everything left is leased by others (phase 3; TAIL_BACKUPS, in-process
engine) generates a backup copy of one of those chunks without taking its lease: one of the
three it has seen leased the longest, in its own random order (so idle hosts spread over the
likeliest stragglers), after checking that its object is not stored yet. The copy reuses the
rows the holder saved to OUT/_partial (kdgen.partial) and saves none itself. Whichever copy is
stored first wins: the chunk object is created once (create-if-absent), the loser finds it
there and drops its rows. A winning copy deletes the holder's claim. The holder learns it from
whichever comes first: its feeder's _claims listings (phase 2 and 3, and after the walk while it
holds leases), or its heartbeat's next renewal failing (at most LEASE_TTL_S/3 later; a slow host
still in phase 1 lists nothing); it then finds the chunk object, and the worker loop drops the
chunk: its requests are aborted in the engine and its lease forgotten. Other copies of a stored
chunk are dropped the same way when their hosts see it finished. A chunk whose partial history
shows an engine death is never copied (a poison row would kill a healthy host's engine). The
copies cost idle engine time only, plus for each one a check that its object is absent, a read
of the chunk's rows, a listing of its _partial folder and one create of its object.

Exactly once is unchanged: leases only decide who works on what; a chunk object is created once
(storage.create_if_absent), by its holder or by a backup copy, with each row once; every path
that finds a chunk finished hands its lease back and moves on, and a late duplicate commit finds
the object there and keeps the first.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from typing import Callable

from kdgen import dataset, storage, writer
from kdgen.dataset import Chunk
from kdgen.inflight import ChunkWork  # the worker loop's unit (kdgen.inflight never imports the feeder)
from kdgen.prompts import Prompt

log = logging.getLogger(__name__)

LEASED_IN_A_ROW = 3  # phase 1 ends after this many chunks in a row leased by other hosts
BACKUP_SPREAD = 3  # the tail: an idle host copies one of the this many longest-leased chunks


class Feeder(threading.Thread):
    """Walks this host's chunk order: skip finished, lease, read rows, build prompts, queue
    ChunkWork (then None when the walk is over; `error` holds what stopped it)."""

    def __init__(self, c, order, builder, claims, heartbeat, out_q, stop):
        super().__init__(name="kdgen-feeder", daemon=True)
        self.c, self.order, self.builder = c, order, builder
        self.claims, self.heartbeat, self.q, self.stop = claims, heartbeat, out_q, stop
        self.error: BaseException | None = None
        self.columns = list(builder.columns())
        self.taken = 0
        self.todo: dict[str, Chunk] = {ch.name: ch for ch in order}  # not known finished, not taken here
        self.poll_s = min(c.lease_ttl_s / 40, 15.0)  # waiting: first poll; doubles while nothing ends
        self.max_poll_s = max(self.poll_s, min(c.lease_ttl_s / 10, 60.0))
        self.out_pages = 1  # of the last listing of OUT
        self.phase = 1
        self.chunks: dict[str, Chunk] = dict(self.todo)  # every chunk of the walk, by name
        # Backup copies in the tail (set by the worker loop, kdgen.runner): whether its engine has
        # nothing left to do, whether a chunk is in its hands, and where to report a chunk this
        # host holds that another host stored. `wake` is set when the engine runs dry.
        self.backups = bool(c.tail_backups and not c.endpoint)
        self.engine_idle: Callable[[], bool] = lambda: False
        self.busy: Callable[[str], bool] = lambda name: False
        self.on_stored_elsewhere: Callable[[str], None] = lambda name: None
        self.wake = threading.Event()
        # From phase 2 on, a lease is taken only once the worker loop has asked for rows it did
        # not have (feed_me): a host's last chunks are not held queued while other hosts idle.
        self.hungry = threading.Event()
        self.backed_up: set[str] = set()
        self.parked_since: dict[str, float] = {}  # name -> when this host first saw it leased

    # ---- thread ------------------------------------------------------------------------------
    def run(self):
        try:
            self.walk()
        except BaseException as e:  # surfaced by the main thread
            self.error = e
        finally:
            self.q.put(None)
        if self.backups and self.error is None:
            try:
                self.watch_held()
            except Exception as e:  # only a faster end is lost: the holder's commit finds the object
                log.warning("watching the claims of the chunks still held stopped: %s", e)

    def walk(self):
        self.walk_in_order()
        if self.todo and not self.stopped():
            self.phase = 2
            self.walk_from_listings()

    def output_url(self, chunk: Chunk) -> str:
        return writer.output_url(self.c.output_path, chunk, self.c.output_file_format)

    def stopped(self) -> bool:
        return self.stop.is_set() or bool(self.c.max_chunks and self.taken >= self.c.max_chunks)

    # ---- phase 1 -----------------------------------------------------------------------------
    def walk_in_order(self) -> None:
        leased_in_a_row = 0
        # _loop sizes the queue as ceil(in-flight target / chunk size) + 1: keep one less queued,
        # which with the chunk being fed still covers the target.
        depth = max(1, (self.q.maxsize or 3) - 2)
        for chunk in self.order:
            if self.stopped():
                return
            if chunk.name not in self.todo:
                continue
            got = self.take(chunk, lambda: self.claims.try_take(chunk.name), depth)
            if got == "done":
                log.info("%s was finished by another host: learning what is left from listings", chunk.name)
                return
            if got == "leased":
                leased_in_a_row += 1
                if leased_in_a_row >= LEASED_IN_A_ROW:
                    log.info("%d chunks in a row leased by other hosts: learning what is left from listings",
                             leased_in_a_row)
                    return
            else:
                leased_in_a_row = 0

    # ---- phases 2 and 3 ----------------------------------------------------------------------
    def walk_from_listings(self) -> None:
        rank = random.Random(f"{self.c.seed}:{self.c.host_index}")
        order = {name: rank.random() for name in self.todo}  # this host's own preference
        free: collections.deque[str] = collections.deque()
        parked: set[str] = set()  # leased by another host when we last looked
        stale = 0

        def relist_out():
            nonlocal free, stale
            self.refresh_finished()
            free = collections.deque(sorted((n for n in self.todo if n not in parked), key=order.__getitem__))
            stale = 0

        def take_parked() -> str | None:
            """Take a parked chunk that is free after all: its claim stayed unchanged for the ttl on
            our clock (its holder is gone), or it is a released marker (a chunk handed back
            unfinished: free at once; only claims the size of a marker are read to tell)."""
            got = None
            for n in sorted(parked, key=order.__getitem__):
                st = leased.get(n)
                if n not in self.todo or st is None or self.busy(n):  # busy: our backup copy runs
                    continue
                if not (self.claims.expired(n, st.generation) or self.claims.released(n, st)):
                    continue
                got = self.take(self.todo[n], lambda: self.claims.take_over(n, st.generation), depth=1)
                if got != "leased":
                    parked.discard(n)
                if got in ("taken", "stopped"):
                    return got
            return got

        relist_out()
        wait_s = self.poll_s
        while self.todo and not self.stopped():
            leased = self.claims.leased()
            self.check_held(leased)
            gone = [n for n in parked if n not in leased]
            parked.difference_update(gone)
            if gone:
                wait_s = self.poll_s
            if len(gone) > self.out_pages:
                relist_out()
            else:
                for n in gone:
                    if n not in self.todo:
                        continue
                    if storage.exists(self.output_url(self.todo[n])):
                        self.finished(n)
                    else:  # its claim was deleted without a commit: pick it first
                        free.appendleft(n)
            got = take_parked()
            while got not in ("taken", "stopped") and free:
                n = free.popleft()
                if n not in self.todo:
                    continue
                if n in leased:
                    parked.add(n)
                    self.parked_since.setdefault(n, time.monotonic())
                    continue
                got = self.take(self.todo[n], lambda: self.claims.try_create(n), depth=1)
                if got == "leased":
                    parked.add(n)
                    self.parked_since.setdefault(n, time.monotonic())
                elif got == "done":
                    stale += 1
                    if stale >= max(3, self.out_pages // 3):  # stale picks cost 3 requests each
                        relist_out()
                        break
            if got not in ("taken", "stopped") and not free and parked:  # markers just parked
                got = take_parked()
            if got == "stopped":
                return
            if got != "taken" and self.todo and not free:
                self.phase = 3  # everything left is leased by other hosts: wait cheaply
                if self.backups and self.engine_idle() and self.back_up(parked, leased, order):
                    continue
                self.nap(wait_s)
                wait_s = min(2 * wait_s, self.max_poll_s)

    # ---- the tail: backup copies -------------------------------------------------------------
    def back_up(self, parked: set[str], leased: dict, order: dict[str, float]) -> bool:
        """Queue a backup copy of the chunk leased by another host that this host has seen leased
        the longest (and has not copied yet); False if there is none."""
        todo = [n for n in parked if n in self.todo and n in leased and n not in self.backed_up]
        todo.sort(key=lambda n: (self.parked_since.get(n, 0.0), order[n]))
        # The longest-leased chunks are the likeliest stragglers; each idle host copies one of the
        # oldest few (in its own order) so that not every idle host copies the same one.
        for n in sorted(todo[:BACKUP_SPREAD], key=order.__getitem__) + todo[BACKUP_SPREAD:]:
            chunk = self.todo[n]
            if storage.exists(self.output_url(chunk)):  # stored since the listing (its claim may be a
                self.finished(n)  # stale pick's brief one): no copy
                continue
            self.backed_up.add(n)
            break
        else:
            return False
        prompts = self.prompts_for(chunk)
        log.info("the rest of the job is leased by other hosts and this engine is idle: generating a backup "
                 "copy of %s (the first copy stored is kept)", n)
        self.q.put(ChunkWork(chunk, None, prompts, backup=True))
        return True

    def check_held(self, leased: dict) -> None:
        """A chunk this host holds whose claim is gone from a listing made after we took it: if its
        object exists, a backup copy was stored (its host deleted our claim): report it."""
        if not self.backups:
            return
        # held() is read after the listing and only this thread takes leases, so every lease held
        # was in the listing unless its claim was deleted since.
        for n in self.heartbeat.held():
            if n not in leased and n in self.chunks and storage.exists(self.output_url(self.chunks[n])):
                self.on_stored_elsewhere(n)

    def watch_held(self) -> None:
        """After the walk: while this host still holds leases, keep listing _claims (backing off)
        so that a chunk stored by a backup copy elsewhere is dropped here, not finished in vain."""
        wait_s = self.poll_s
        while not self.stop.is_set() and self.heartbeat.held():
            self.nap(wait_s)
            if self.stop.is_set() or not self.heartbeat.held():
                return
            self.check_held(self.claims.leased())
            wait_s = min(2 * wait_s, self.max_poll_s)

    def nap(self, seconds: float) -> None:
        """Wait up to `seconds`; sooner when the job stops or the engine runs dry (`wake`)."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.wake.wait(min(left, 1.0)):
                self.wake.clear()
                return

    def refresh_finished(self) -> None:
        """One listing of OUT: drop every finished chunk from the walk."""
        names = writer.finished_chunk_names(self.c.output_path)
        self.out_pages = max(1, math.ceil(len(names) / 1000))
        for n in names:
            if n in self.todo:
                self.finished(n)

    def finished(self, name: str) -> None:
        self.todo.pop(name, None)
        self.claims.forget(name)
        if name in self.backed_up:  # our copy of it, if still running, is in vain: drop it
            self.on_stored_elsewhere(name)

    # ---- one chunk ---------------------------------------------------------------------------
    def feed_me(self) -> None:
        """From the worker loop: the engine has room and no rows to fill it with."""
        self.hungry.set()
        with self.q.not_full:
            self.q.not_full.notify_all()

    def wait_for_room(self, depth: int) -> bool:
        """Block until fewer than `depth` chunks are queued (so a lease is taken only when its chunk
        can be started soon) and, from phase 2 on, until the worker loop asks for rows; False if
        the job is stopping."""
        with self.q.not_full:
            while len(self.q.queue) >= depth or (self.phase >= 2 and not self.hungry.is_set()):
                if self.stop.is_set():
                    return False
                self.q.not_full.wait(0.5)
        return not self.stop.is_set()

    def take(self, chunk: Chunk, lease_it, depth: int) -> str:
        """Lease `chunk` (lease_it() -> Lease | None), check it is still unfinished, read and
        queue it. Returns 'taken', 'done' (finished by another host: lease handed back),
        'leased' (another host holds it) or 'stopped'."""
        if not self.wait_for_room(depth):
            return "stopped"
        lease = lease_it()
        if lease is None:
            return "leased"
        # Check again now that the lease is ours: a holder may have committed the chunk and
        # released its lease between what we knew and our take.
        if storage.exists(self.output_url(chunk)):
            self.claims.release(lease, committed=True)
            self.finished(chunk.name)
            return "done"
        self.heartbeat.add(lease)
        self.taken += 1
        self.todo.pop(chunk.name, None)
        try:
            prompts = self.prompts_for(chunk)
        except BaseException:  # the job stops; hand the chunk back to other hosts at once
            self.heartbeat.remove(chunk.name)
            self.claims.release(lease, lease.attempt - 1)  # not the chunk's fault: no failed attempt
            raise
        self.hungry.clear()
        self.q.put(ChunkWork(chunk, lease, prompts))
        return "taken"

    def prompts_for(self, chunk: Chunk) -> list[Prompt]:
        """The chunk's prompts, one per row, in row order. Rows of a row group that does not
        decode are error records (their own data); a storage failure, a changed input file or
        any other exception raises and stops the job, leaving the rows to a later run."""
        rows = dataset.read_chunk_rows(chunk, self.columns)
        prompts = []
        for start, end, reason in rows.bad:
            log.error("%s: %d rows recorded as errors: %s", chunk.name, end - start, reason)
            prompts += [Prompt(row_idx=r, error=reason, error_kind="data") for r in range(start, end)]
        for start, table in rows.parts:
            prompts += self.builder.build_table(table, start)
        prompts.sort(key=lambda p: p.row_idx)
        return prompts

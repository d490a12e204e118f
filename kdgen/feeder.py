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

The tail. From phase 2 on, a host keeps at most one chunk queued, so the last chunks of the job
spread over the hosts that are free instead of waiting behind a slow host's engine; what a slow
host still holds at the very end is what its engine is generating (the chunk being generated and
the one queued behind it). Cutting those would mean sharing partial results of a chunk between
hosts (the partial-progress objects of the faults branch could carry that), which this walk
does not do: with chunks small against a host's share of the job the tail is a few chunk-times
of one host (bench/fleet_sim.py measures it).

Exactly once is unchanged: leases only decide who works on what; a chunk object is created once
(storage.create_if_absent); every path that finds a chunk finished hands its lease back and
moves on, and a late duplicate commit finds the object there and keeps the first.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading

from kdgen import dataset, storage, writer
from kdgen.dataset import Chunk
from kdgen.inflight import ChunkWork  # the worker loop's unit (kdgen.inflight never imports the feeder)
from kdgen.prompts import Prompt

log = logging.getLogger(__name__)

LEASED_IN_A_ROW = 3  # phase 1 ends after this many chunks in a row leased by other hosts


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

    # ---- thread ------------------------------------------------------------------------------
    def run(self):
        try:
            self.walk()
        except BaseException as e:  # surfaced by the main thread
            self.error = e
        finally:
            self.q.put(None)

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
                if n not in self.todo or st is None:
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
                    continue
                got = self.take(self.todo[n], lambda: self.claims.try_create(n), depth=1)
                if got == "leased":
                    parked.add(n)
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
                self.phase = 3
                self.stop.wait(wait_s)  # everything left is leased by other hosts: wait cheaply
                wait_s = min(2 * wait_s, self.max_poll_s)

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

    # ---- one chunk ---------------------------------------------------------------------------
    def wait_for_room(self, depth: int) -> bool:
        """Block until fewer than `depth` chunks are queued (so a lease is taken only when its chunk
        can be started soon); False if the job is stopping."""
        with self.q.not_full:
            while len(self.q.queue) >= depth:
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

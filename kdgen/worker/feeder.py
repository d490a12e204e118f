"""The feeder: which chunk this host generates next, read ahead of the engine, at a storage cost
that grows with the chunks, not with hosts x chunks.

Each host walks its own rotation of the shared plan in three phases (its own share in order;
the rest from listings of OUT and _claims; waiting on live leases), leases a chunk, checks it is
still unfinished, reads its rows and queues it. At the end an idle host makes backup copies of
the chunks other hosts still hold; the first copy stored wins. The design and its request costs:
docs/protocol.md#which-chunk-next-the-walk and #the-tail-backup-copies.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus.dataset import Chunk
from kdgen.prompts import Prompt
from kdgen.records import naming
from kdgen.worker.custody import Custodian
from kdgen.worker.handoff import Handoff
from kdgen.worker.work import ChunkWork

log = logging.getLogger(__name__)

LEASED_IN_A_ROW = 3  # phase 1 ends after this many chunks in a row leased by other hosts
BACKUP_SPREAD = 3  # the tail: an idle host copies one of the this many longest-leased chunks


@dataclass
class Listings:
    """What phases 2 and 3 of the walk know from their listings of OUT and _claims."""
    order: dict[str, float]  # this host's own preference among the chunks left
    free: collections.deque = field(default_factory=collections.deque)  # neither finished nor leased
    parked: set[str] = field(default_factory=set)  # leased by another host when we last looked
    leased: dict = field(default_factory=dict)  # the last listing of _claims: name -> Stat
    stale: int = 0  # picks found finished since the last listing of OUT


class Feeder(threading.Thread):
    """Walks this host's chunk order: skip finished, lease, read rows, build prompts, queue
    ChunkWork on the handoff (then None when the walk is over; `error` holds what stopped it).
    The custodian ends each chunk it leased; it also tells whether this host's engine has
    nothing left (the tail), and is where a chunk this host holds that another stored is reported."""

    def __init__(self, c, order, builder, claims, custodian: Custodian, handoff: Handoff, stop: threading.Event):
        super().__init__(name="kdgen-feeder", daemon=True)
        self.c, self.order, self.builder = c, order, builder
        self.claims, self.custodian, self.handoff, self.stop = claims, custodian, handoff, stop
        self.error: BaseException | None = None
        self.columns = list(builder.columns())
        self.taken = 0
        self.todo: dict[str, Chunk] = {ch.name: ch for ch in order}  # not known finished, not taken here
        self.poll_s = min(c.lease_ttl_s / 40, 15.0)  # waiting: first poll; doubles while nothing ends
        self.max_poll_s = max(self.poll_s, min(c.lease_ttl_s / 10, 60.0))
        self.out_pages = 1  # of the last listing of OUT
        self.phase = 1
        self.chunks: dict[str, Chunk] = dict(self.todo)  # every chunk of the walk, by name
        self.backups = bool(c.tail_backups and not c.endpoint)  # backup copies in the tail
        self.backed_up: set[str] = set()
        self.parked_since: dict[str, float] = {}  # name -> when this host first saw it leased

    # ---- thread ------------------------------------------------------------------------------
    def run(self):
        try:
            self.walk()
        except BaseException as e:  # surfaced by the main thread
            self.error = e
        finally:
            self.handoff.close(self.error)
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
        return naming.output_url(self.c.output_path, chunk, self.c.output_file_format)

    def stopped(self) -> bool:
        return self.stop.is_set() or bool(self.c.max_chunks and self.taken >= self.c.max_chunks)

    # ---- phase 1 -----------------------------------------------------------------------------
    def walk_in_order(self) -> None:
        leased_in_a_row = 0
        # The worker loop sizes the handoff as ceil(in-flight target / chunk size) + 1: keep one less queued,
        # which with the chunk being fed still covers the target.
        depth = max(1, (self.handoff.maxsize or 3) - 2)
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
        w = Listings({name: rank.random() for name in self.todo})
        self.relist_out(w)
        wait_s = self.poll_s
        while self.todo and not self.stopped():
            if self.look_at_claims(w):
                wait_s = self.poll_s
            got = self.pick(w)
            if got == "stopped":
                return
            if got != "taken" and self.todo and not w.free:
                self.phase = 3  # everything left is leased by other hosts: wait cheaply
                if self.backups and self.custodian.idle() and self.back_up(w.parked, w.leased, w.order):
                    continue
                self.handoff.nap(wait_s, self.stop)
                wait_s = min(2 * wait_s, self.max_poll_s)

    def relist_out(self, w: Listings) -> None:
        self.refresh_finished()
        w.free = collections.deque(sorted((n for n in self.todo if n not in w.parked), key=w.order.__getitem__))
        w.stale = 0

    def look_at_claims(self, w: Listings) -> bool:
        """List _claims; the chunks whose claims disappeared are finished or free again. True if any did."""
        w.leased = self.claims.leased()
        self.check_held(w.leased)
        gone = [n for n in w.parked if n not in w.leased]
        w.parked.difference_update(gone)
        if len(gone) > self.out_pages:
            self.relist_out(w)
        else:
            for n in gone:
                if n not in self.todo:
                    continue
                if storage.exists(self.output_url(self.todo[n])):
                    self.finished(n)
                else:  # its claim was deleted without a commit: pick it first
                    w.free.appendleft(n)
        return bool(gone)

    def pick(self, w: Listings) -> str | None:
        """Take a parked chunk that is free after all, else the next free one; what `take` said."""
        got = self.take_parked(w)
        while got not in ("taken", "stopped") and w.free:
            n = w.free.popleft()
            if n not in self.todo:
                continue
            if n in w.leased:
                self.park(w, n)
                continue
            got = self.take(self.todo[n], lambda: self.claims.try_create(n), depth=1)
            if got == "leased":
                self.park(w, n)
            elif got == "done":
                w.stale += 1
                if w.stale >= max(3, self.out_pages // 3):  # stale picks cost 3 requests each
                    self.relist_out(w)
                    break
        if got not in ("taken", "stopped") and not w.free and w.parked:  # markers just parked
            got = self.take_parked(w)
        return got

    def park(self, w: Listings, n: str) -> None:
        w.parked.add(n)
        self.parked_since.setdefault(n, time.monotonic())

    def take_parked(self, w: Listings) -> str | None:
        """Take a parked chunk that is free after all: its claim stayed unchanged for the ttl on
        our clock (its holder is gone), or it is a released marker (a chunk handed back
        unfinished: free at once; only claims the size of a marker are read to tell)."""
        got = None
        for n in sorted(w.parked, key=w.order.__getitem__):
            st = w.leased.get(n)
            if n not in self.todo or st is None or self.custodian.busy(n):  # busy: our backup copy runs
                continue
            if not (self.claims.expired(n, st.generation) or self.claims.released(n, st)):
                continue
            got = self.take(self.todo[n], lambda: self.claims.take_over(n, st.generation), depth=1)
            if got != "leased":
                w.parked.discard(n)
            if got in ("taken", "stopped"):
                return got
        return got

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
        self.handoff.put(ChunkWork(chunk, self.custodian.take(n, None, backup=True), prompts))
        return True

    def check_held(self, leased: dict) -> None:
        """A chunk this host holds whose claim is gone from a listing made after we took it: if its
        object exists, a backup copy was stored (its host deleted our claim): report it."""
        if not self.backups:
            return
        # held() is read after the listing and only this thread takes leases, so every lease held
        # was in the listing unless its claim was deleted since.
        for n in self.custodian.held():
            if n not in leased and n in self.chunks and storage.exists(self.output_url(self.chunks[n])):
                self.custodian.report_stored(n)

    def watch_held(self) -> None:
        """After the walk: while this host still holds leases, keep listing _claims (backing off)
        so that a chunk stored by a backup copy elsewhere is dropped here, not finished in vain."""
        wait_s = self.poll_s
        while not self.stop.is_set() and self.custodian.held():
            self.handoff.nap(wait_s, self.stop)
            if self.stop.is_set() or not self.custodian.held():
                return
            self.check_held(self.claims.leased())
            wait_s = min(2 * wait_s, self.max_poll_s)

    def refresh_finished(self) -> None:
        """One listing of OUT: drop every finished chunk from the walk."""
        names = naming.finished_chunk_names(self.c.output_path)
        self.out_pages = max(1, math.ceil(len(names) / 1000))
        for n in names:
            if n in self.todo:
                self.finished(n)

    def finished(self, name: str) -> None:
        self.todo.pop(name, None)
        self.claims.forget(name)
        if name in self.backed_up:  # our copy of it, if still running, is in vain: drop it
            self.custodian.report_stored(name)

    # ---- one chunk ---------------------------------------------------------------------------
    def feed_me(self) -> None:
        """From the worker loop: the engine has room and no rows to fill it with."""
        self.handoff.feed_me()

    def take(self, chunk: Chunk, lease_it, depth: int) -> str:
        """Lease `chunk` (lease_it() -> Lease | None), check it is still unfinished, read and
        queue it. Returns 'taken', 'done' (finished by another host: lease handed back),
        'leased' (another host holds it) or 'stopped'. Waits first until fewer than `depth`
        chunks are queued (a lease is taken only when its chunk can be started soon) and, from
        phase 2 on, until the worker loop asks for rows (a host's last chunks are not held
        queued while other hosts idle)."""
        if not self.handoff.wait_for_room(depth, self.phase >= 2, self.stop):
            return "stopped"
        lease = lease_it()
        if lease is None:
            return "leased"
        custody = self.custodian.take(chunk.name, lease)
        # Check again now that the lease is ours: a holder may have committed the chunk and
        # released its lease between what we knew and our take.
        if storage.exists(self.output_url(chunk)):
            custody.drop()
            self.finished(chunk.name)
            return "done"
        self.taken += 1
        self.todo.pop(chunk.name, None)
        try:
            prompts = self.prompts_for(chunk)
        except BaseException:  # the job stops; hand the chunk back to other hosts at once
            custody.hand_back()  # not the chunk's fault: no failed attempt
            raise
        self.handoff.fed()
        self.handoff.put(ChunkWork(chunk, custody, prompts))
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

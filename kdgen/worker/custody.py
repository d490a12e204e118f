"""Custody of the chunks this process works on: the one place that releases their leases, counts
their attempts and deletes their partial progress. A chunk goes

    taken -> feeding -> complete -> committed
        \\-> dropped (stored by another host)   \\-> handed_back (unfinished: a released marker)

(taken and feeding may also end dropped or handed back; complete may be handed back when its
commit fails). Any other move raises IllegalTransition. Leases: docs/protocol.md#leases.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, wait

from kdgen.fleet import partial
from kdgen.fleet.leases import Lease

log = logging.getLogger(__name__)

TAKEN, FEEDING, COMPLETE = "taken", "feeding", "complete"  # held: its lease is renewed
COMMITTED, HANDED_BACK, DROPPED = "committed", "handed_back", "dropped"  # ended: nothing held
MOVES = {
    TAKEN: {FEEDING, DROPPED, HANDED_BACK},  # leased and read by the feeder, queued
    FEEDING: {COMPLETE, DROPPED, HANDED_BACK},  # taken up by the worker loop: rows in the engine
    COMPLETE: {COMMITTED, HANDED_BACK},  # every row has its outcome: with the committer
}


class IllegalTransition(RuntimeError):
    """A chunk was moved in a way its custody does not allow (a bug, never a storage state)."""


class Custody:
    """One chunk held by this process: its lease (None for a backup copy), its state, and whether
    segments of it exist in OUT/_partial (to delete once its object is stored)."""

    def __init__(self, custodian: Custodian, name: str, lease: Lease | None, backup: bool):
        self.custodian, self.name, self.lease, self.backup = custodian, name, lease, backup
        self.state = TAKEN
        self.partials = False  # segments of this chunk exist (an earlier holder's or ours)
        self.saves: list[Future] = []  # our segment writes under way

    def __repr__(self) -> str:
        return f"Custody({self.name}, {self.state})"

    @property
    def attempt(self) -> int:
        return self.lease.attempt if self.lease is not None else 1

    @property
    def lost(self) -> bool:
        """Another host took the lease over (the heartbeat's renewal failed)."""
        return self.lease is not None and self.name in self.custodian.heartbeat.lost()

    def _move(self, to: str) -> None:
        with self.custodian.lock:
            if to not in MOVES.get(self.state, ()):
                raise IllegalTransition(f"{self.name}: {self.state} -> {to}")
            self.state = to
            if to not in MOVES:
                self.custodian.open.discard(self)

    # ---- the moves ------------------------------------------------------------------------------
    def start_feeding(self) -> None:
        self._move(FEEDING)

    def complete(self) -> None:
        self._move(COMPLETE)

    def committed(self, created: bool) -> None:
        """Its object exists (`created`: by us): delete the lease, and a winning backup copy deletes
        the holder's claim (so the holder stops); then its segments (after our writes land)."""
        self._move(COMMITTED)
        self._delete_lease()
        if self.backup and created:
            self.custodian.claims.drop(self.name)
            log.info("%s: stored the backup copy first; its holder's claim is deleted", self.name)
        if self.partials:
            self.wait_saves()  # a segment that lands after the cleanup would be litter
            partial.cleanup(self.custodian.out, self.name)

    def drop(self) -> None:
        """Stored by another host (or found stored right after the take): delete the lease, and
        its segments off this thread (written before or after the other host's commit)."""
        self._move(DROPPED)
        self._delete_lease()
        if self.partials:
            self.custodian.saver.submit(self._cleanup)

    def hand_back(self) -> None:
        """Unfinished (a stop, a failed read or commit): keep the claim as a released marker any
        host takes at once; a hand-back is not the chunk's fault, so no failed attempt counts."""
        self._move(HANDED_BACK)
        if self.lease is not None:
            self.custodian.heartbeat.remove(self.name)
            self.custodian.claims.release(self.lease, self.lease.attempt - 1)

    def close_lost(self) -> None:
        """Unfinished, and the lease is no longer ours to hand back (taken over meanwhile)."""
        self._move(HANDED_BACK)

    def count_attempt(self) -> int:
        """The engine died on this chunk: its lease records the next attempt number."""
        if self.state != FEEDING:
            raise IllegalTransition(f"{self.name}: an attempt counted while {self.state}")
        lease = self.lease
        if lease is None:
            return 1
        hb = self.custodian.heartbeat
        hb.remove(lease.name)
        lease.attempt += 1
        try:
            ok = self.custodian.claims.renew(lease)
        except Exception as e:  # transient: the next heartbeat writes it
            log.warning("could not record attempt %d on %s: %s", lease.attempt, lease.name, e)
            ok = True
        if ok:
            hb.add(lease)
        else:
            log.warning("lost the lease on %s while recording attempt %d", lease.name, lease.attempt)
        return lease.attempt

    # ---- partial progress -----------------------------------------------------------------------
    def note_save(self, fut: Future) -> None:
        self.partials = True
        self.saves = [f for f in self.saves if not f.done()] + [fut]

    def wait_saves(self, timeout: float = 60.0) -> None:
        """Let segment writes under way land (before the segments are deleted after a commit)."""
        wait(self.saves, timeout=timeout)
        self.saves = []

    def _delete_lease(self) -> None:
        if self.lease is not None:
            self.custodian.heartbeat.remove(self.name)
            self.custodian.claims.release(self.lease, committed=True)

    def _cleanup(self) -> None:
        self.wait_saves()
        try:
            partial.cleanup(self.custodian.out, self.name)
        except Exception as e:  # litter in _partial costs nothing but a listing
            log.warning("could not delete the partial progress of %s: %s", self.name, e)


class Custodian:
    """Every chunk this process holds, and the chunks another host stored meanwhile (reported by
    the feeder's thread, acted on by the worker loop's)."""

    def __init__(self, out: str, claims, heartbeat, saver):
        self.out, self.claims, self.heartbeat, self.saver = out, claims, heartbeat, saver
        self.lock = threading.Lock()
        self.open: set[Custody] = set()
        self._stored: set[str] = set()

    def take(self, name: str, lease: Lease | None, backup: bool = False) -> Custody:
        """Custody of a chunk just leased (renewed from now on), or of a backup copy (no lease)."""
        custody = Custody(self, name, lease, backup)
        with self.lock:
            self.open.add(custody)
        if lease is not None:
            self.heartbeat.add(lease)
        return custody

    def _held(self) -> list[Custody]:
        with self.lock:
            return [x for x in self.open if x.state in (TAKEN, FEEDING)]

    def busy(self, name: str) -> bool:
        """Is `name` queued or being fed to the engine here (a backup copy of it, say)?"""
        return any(x.name == name for x in self._held())

    def idle(self) -> bool:
        """Nothing queued and nothing fed to the engine: it runs dry."""
        return not self._held()

    def held(self) -> list[str]:
        """The names of the leases being renewed."""
        return self.heartbeat.held()

    def hand_back_all(self) -> int:
        """Stopping: hand back every chunk queued or fed whose lease is still ours; how many."""
        renewed = set(self.heartbeat.held())
        n = 0
        for x in sorted(self._held(), key=lambda x: x.name):
            if x.lease is not None and x.name in renewed:
                x.hand_back()
                n += 1
            else:
                x.close_lost()
        return n

    def report_stored(self, name: str) -> None:
        """From the feeder's thread: `name`, which this host holds or copies, was stored elsewhere."""
        with self.lock:
            self._stored.add(name)

    def stored_reports(self) -> set[str]:
        """The names reported since the last call."""
        with self.lock:
            names, self._stored = self._stored, set()
        return names

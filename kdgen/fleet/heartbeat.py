"""The heartbeat: a daemon thread that keeps this host's leases (kdgen.fleet.leases) alive by
renewing each one ttl/3 after its last write, and remembers the ones lost to another host.
"""

from __future__ import annotations

import logging
import threading

from kdgen.fleet.leases import ClaimStore, Lease

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that renews each held lease ttl/3 after its last write (checking four times
    per ttl/3) and remembers the ones lost. Renewing each lease on its own schedule, not all of
    them on one beat, renews a lease only as often as its own age requires."""

    def __init__(self, claims: ClaimStore, interval_s: float | None = None):
        self.claims = claims
        self.interval_s = claims.ttl_s / 3 if interval_s is None else interval_s
        self._held: dict[str, Lease] = {}
        self._lost: set[str] = set()
        self._lock = threading.Lock()  # guards _held and _lost
        self._renewing = threading.Lock()  # held while one lease is renewed; remove() waits on it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdgen-heartbeat", daemon=True)
        self._thread.start()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._held[lease.name] = lease
            self._lost.discard(lease.name)

    def remove(self, name: str) -> None:
        """Stop renewing `name`; once this returns no renewal of it is in flight."""
        with self._renewing, self._lock:
            self._held.pop(name, None)

    def lost(self) -> set[str]:
        with self._lock:
            return set(self._lost)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def leases(self) -> list[Lease]:
        """The leases still held (being renewed)."""
        with self._lock:
            return list(self._held.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval_s))

    def beat(self, force: bool = False) -> None:
        """Renew every held lease written interval_s ago or earlier (force: every held lease)."""
        with self._lock:
            leases = list(self._held.values())
        now = self.claims.mono()
        for lease in leases:
            if self._stop.is_set():
                return
            if not force and now - lease.written_mono < self.interval_s:
                continue
            with self._renewing:
                with self._lock:
                    if self._held.get(lease.name) is not lease:
                        continue  # removed meanwhile
                try:
                    ok = self.claims.renew(lease)
                except Exception as e:  # transient: try again next beat, unless it has run out
                    ok = self.claims.clock() < lease.expires_at
                    log.warning("could not renew the lease on %s: %s", lease.name, e)
                if not ok:
                    log.warning("lost the lease on %s (another host took it over)", lease.name)
                    with self._lock:
                        self._held.pop(lease.name, None)
                        self._lost.add(lease.name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s / 4):
            try:
                self.beat()
            except Exception as e:  # never let the thread die
                log.error("heartbeat: %s", e)

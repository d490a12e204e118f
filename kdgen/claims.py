"""Leases on chunks, kept as objects in the output directory: OUT/_claims/{chunk}.json.

Take: create the claim if absent. Renew: compare-and-swap on the generation we hold. Steal an
expired lease (or our own, after a restart under the same owner id): compare-and-swap on the
generation we read. Claims are hints only: a chunk is finished when its output object exists,
and that object is itself created once (storage.create_if_absent).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from kdgen import storage

log = logging.getLogger(__name__)

CLAIMS_DIR = "_claims"


@dataclass
class Lease:
    name: str
    owner: str
    nonce: str
    generation: str  # of the claim object as we last wrote it; renew updates it in place
    expires_at: float
    taken_at: float = 0.0
    attempt: int = 1  # 1 + the earlier attempts on this chunk that failed (see release)


class ClaimStore:
    def __init__(self, out_url: str, owner: str, ttl_s: float = 600.0, clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.out_url, self.owner, self.ttl_s, self.clock = out_url, owner, float(ttl_s), clock
        self.dir_url = storage.join(out_url, CLAIMS_DIR)
        self._host, self._pid = socket.gethostname(), os.getpid()

    def url(self, name: str) -> str:
        return storage.join(self.dir_url, name + ".json")

    def _body(self, name: str, nonce: str, now: float, taken_at: float, attempt: int = 1,
              released: bool = False) -> bytes:
        return json.dumps({
            "name": name, "owner": self.owner, "nonce": nonce, "expires_at": now if released else now + self.ttl_s,
            "taken_at": taken_at, "renewed_at": now, "host": self._host, "pid": self._pid,
            "attempt": attempt, **({"released": True} if released else {}),
        }, sort_keys=True).encode()

    def try_take(self, name: str) -> Lease | None:
        """Lease `name` for ttl_s; None while another owner holds a live lease on it."""
        url = self.url(name)
        for _ in range(3):  # a claim deleted between our create and our read: try again
            now = self.clock()
            nonce = uuid.uuid4().hex
            body = self._body(name, nonce, now, now)
            st = storage.create_if_absent_stat(url, body)
            if st is not None:
                return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now)
            # Stat first, then read: if the claim changes in between, our CAS on the older
            # generation fails, so we never act on a generation newer than the body we judged.
            cur_st = storage.stat(url)
            if cur_st is None:
                continue
            try:
                cur = json.loads(storage.read_bytes(url))
                owner, expires_at = cur["owner"], float(cur["expires_at"])
                failed = int(cur.get("attempt", 1))  # a live or expired lease: that attempt failed
                if cur.get("released"):  # handed back: free now, and it counted only failed attempts
                    owner, expires_at, failed = None, float("-inf"), int(cur.get("attempt", 0))
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError):  # not a claim we can read: treat as expired
                log.warning("claim %s is unreadable; taking it over", url)
                owner, expires_at, failed = None, float("-inf"), 0
            if owner != self.owner and expires_at > now:
                return None
            if owner == self.owner and expires_at > now:
                log.info("taking back %s, leased earlier by this owner (%s)", name, self.owner)
            body = self._body(name, nonce, now, now, attempt=failed + 1)
            st = storage.replace_if_generation_stat(url, body, cur_st.generation)
            return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now, failed + 1) if st else None
        return None

    def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it was lost (stolen or deleted). Updates lease in place."""
        now = self.clock()
        nonce = uuid.uuid4().hex
        body = self._body(lease.name, nonce, now, lease.taken_at or now, lease.attempt)
        st = storage.replace_if_generation_stat(self.url(lease.name), body, lease.generation)
        if st is None:
            return False
        lease.nonce, lease.generation, lease.expires_at = nonce, st.generation, now + self.ttl_s
        return True

    def release(self, lease: Lease, failed_attempts: int | None = None) -> None:
        """Best effort: delete the claim if it is still the one we wrote. Never raises.

        failed_attempts (a chunk handed back unfinished): keep the claim as a released marker
        that any host may take at once and that carries the number of failed attempts, so the
        next holder's attempt number counts on (a graceful stop passes lease.attempt - 1)."""
        try:
            if failed_attempts is None:
                storage.delete(self.url(lease.name), if_generation=lease.generation)
                return
            now = self.clock()
            body = self._body(lease.name, uuid.uuid4().hex, now, lease.taken_at or now, failed_attempts, released=True)
            if storage.replace_if_generation_stat(self.url(lease.name), body, lease.generation) is None:
                log.info("the claim on %s changed meanwhile; left it as it is", lease.name)
        except Exception as e:  # it expires on its own
            log.warning("could not release the claim on %s: %s", lease.name, e)

    def list_leases(self) -> list[dict]:
        """Every claim as a dict (name, owner, expires_at, ...); unreadable ones as {name, corrupt}."""
        names = [n for n in storage.list_names(self.dir_url) if n.endswith(".json")]

        def load(n: str) -> dict | None:
            chunk = n[: -len(".json")]
            try:
                d = json.loads(storage.read_bytes(storage.join(self.dir_url, n)))
                if not isinstance(d, dict):
                    raise ValueError("not an object")
            except FileNotFoundError:  # released since the listing
                return None
            except ValueError:
                return {"name": chunk, "corrupt": True}
            d["name"] = chunk
            return d

        if not names:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            return [d for d in pool.map(load, names) if d is not None]


class Heartbeat:
    """A daemon thread that renews the held leases every ttl/3 and remembers the ones lost."""

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

    def beat(self) -> None:
        """Renew every held lease once (the thread calls this every interval_s)."""
        with self._lock:
            leases = list(self._held.values())
        for lease in leases:
            if self._stop.is_set():
                return
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
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as e:  # never let the thread die
                log.error("heartbeat: %s", e)

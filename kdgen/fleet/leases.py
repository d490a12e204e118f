"""Leases on chunks, kept as objects in the output directory: OUT/_claims/{chunk}.json.

Take: create the claim if absent. Renew: compare-and-swap on the generation we hold. Steal an
expired lease: compare-and-swap on the generation we read. Expiry is judged on the reader's own
monotonic clock (a claim unchanged for ttl_s), never on anyone's wall clock. Claims are hints
only: a chunk is finished when its output object exists. Owner ids, the process identity in a
claim and when an owner may take back its own lease: docs/protocol.md#leases.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from kdgen import storage

log = logging.getLogger(__name__)

CLAIMS_DIR = "_claims"
# A released marker is padded to at least this many bytes, so that a walk that learns claims
# from listings (sizes included) reads only the claims that may be markers; a live claim this
# large (an absurd HOST_ID or chunk name) only costs that read.
RELEASED_MIN_SIZE = 4096
SKEW_WARN_S = 60.0
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_identity(host_id: str = "") -> tuple[str, str]:
    """(identity, source) of this machine: HOST_ID, else the machine id, else the hostname.

    The hostname is the last resort because `docker run` without --hostname makes a new one per
    run (a restarted container then waits for its old leases to expire)."""
    if host_id:
        return host_id, "host_id"
    for path in MACHINE_ID_PATHS:
        mid = _read(path)
        if mid:
            return mid[:16], "machine-id"
    return socket.gethostname(), "hostname"


def owner_id(c) -> str:
    """This host's owner id in claims and _hosts/ reports (c: a JobConfig): stable across restarts
    of the same host (HOST_ID, else the machine id, else the hostname, then the host index), so
    a restarted host can take its own leases back."""
    identity, _ = machine_identity(c.host_id)
    return f"{identity}:{c.host_index}{os.environ.get('KDGEN_OWNER_SUFFIX', '')}"


def claim_store(c) -> "ClaimStore":
    """This host's view of the leases in OUTPUT_PATH (c: a JobConfig)."""
    _, source = machine_identity(c.host_id)
    return ClaimStore(c.output_path, owner_id(c), ttl_s=c.lease_ttl_s, identity_source=source)


def _proc_start(pid: int | str) -> str:
    """Start time of a process (clock ticks since boot), '' if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


def process_marker() -> dict:
    """What identifies this process on this machine, for the owner to judge later whether it is gone."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {"boot": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns, "pid": os.getpid(),
            "proc_start": _proc_start("self")}


@dataclass
class Lease:
    name: str
    owner: str
    nonce: str
    generation: str  # of the claim object as we last wrote it; renew updates it in place
    expires_at: float
    taken_at: float = 0.0
    written_mono: float = 0.0  # our monotonic clock just before the request that wrote `generation`
    attempt: int = 1  # 1 + the earlier attempts on this chunk that failed (see release)
    # Created where no claim existed: no earlier holder left anything (a holder that stops
    # without committing leaves its claim, live, expired or released), so no partial rows to read.
    fresh: bool = False


class ClaimStore:
    def __init__(self, out_url: str, owner: str, ttl_s: float = 600.0, clock: Callable[[], float] = time.time,
                 identity_source: str = "machine-id", mono: Callable[[], float] = time.monotonic):
        """identity_source: how `owner` was made (machine_identity's source); it decides what
        proves that an earlier process of the same owner is gone. clock: wall time written into
        claims (for people); mono: the clock that judges expiry."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.out_url, self.owner, self.ttl_s, self.clock, self.mono = out_url, owner, float(ttl_s), clock, mono
        self.identity_source = identity_source
        self.dir_url = storage.join(out_url, CLAIMS_DIR)
        self._host, self._pid = socket.gethostname(), os.getpid()
        self.marker = process_marker()
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # name -> (generation, mono time first seen at it)
        self._bodies: OrderedDict[tuple[str, str], dict] = OrderedDict()  # (name, generation) -> claim body
        self._skew_warned: set[str] = set()

    def url(self, name: str) -> str:
        return storage.join(self.dir_url, name + ".json")

    def _body(self, name: str, nonce: str, now: float, taken_at: float, attempt: int = 1,
              released: bool = False) -> bytes:
        return json.dumps({
            "name": name, "owner": self.owner, "nonce": nonce, "expires_at": now if released else now + self.ttl_s,
            "taken_at": taken_at, "renewed_at": now, "host": self._host, **self.marker,
            "attempt": attempt, **({"released": True, "pad": " " * RELEASED_MIN_SIZE} if released else {}),
        }, sort_keys=True).encode()

    def process_gone(self, claim: dict) -> bool:
        """Is the process that wrote this claim of our own owner id provably gone?"""
        me = self.marker
        if not claim.get("boot") or not me["boot"]:
            return False
        if claim["boot"] != me["boot"]:  # that machine rebooted since (if the id is really this machine's)
            return self.identity_source in ("host_id", "machine-id")
        if claim.get("pid_ns") != me["pid_ns"]:  # another container: only HOST_ID promises it is us
            return self.identity_source == "host_id"
        if claim.get("pid") == me["pid"] and claim.get("proc_start") == me["proc_start"]:
            return True  # this very process (a ClaimStore made again)
        return _proc_start(claim.get("pid", "")) != claim.get("proc_start")

    # ---- expiry by observation --------------------------------------------------------------
    def observe(self, name: str, generation: str) -> float:
        """Record that the claim on `name` is at `generation` now; returns for how many seconds
        (of our monotonic clock) we have seen it at that generation."""
        now = self.mono()
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen[0] != generation:
                self._seen[name] = (generation, now)
                return 0.0
            return now - seen[1]

    def expired(self, name: str, generation: str) -> bool:
        """True once the claim has stayed at `generation` for ttl_s on our clock."""
        return self.observe(name, generation) >= self.ttl_s

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)

    def _claim_body(self, name: str, url: str, st: storage.Stat) -> dict | None:
        """The claim's body at generation st.generation (read once per generation); {} if it is
        not a claim we can read; None if it is gone."""
        key = (name, st.generation)
        with self._lock:
            if key in self._bodies:
                return self._bodies[key]
        try:
            body = json.loads(storage.read_bytes(url))
            if not isinstance(body, dict) or "owner" not in body:
                raise ValueError("not a claim")
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            body = {}
        self._check_skew(body, st)
        with self._lock:
            self._bodies[key] = body
            while len(self._bodies) > 4096:
                self._bodies.popitem(last=False)
        return body

    def _check_skew(self, body: dict, st: storage.Stat) -> None:
        """Warn (once per owner) about a writer whose clock is off by more than SKEW_WARN_S: against
        the storage server's time of the write (gs://), else against our clock (ahead only: a
        renewal we read may be up to ttl/3 old)."""
        owner, t = body.get("owner"), body.get("renewed_at")
        if not isinstance(t, (int, float)) or owner in self._skew_warned:
            return
        if storage.is_remote(self.dir_url) and st.mtime:
            skew, against = t - st.mtime, "the storage server's"
        else:
            skew, against = t - self.clock(), "this host's"
            if skew < 0:
                return
        if abs(skew) > SKEW_WARN_S:
            self._skew_warned.add(owner)
            log.warning("the clock of %s (%s) is %+.0f s off %s; leases are judged by how long they stay "
                        "unchanged, not by their timestamps, but fix the clock (NTP)", owner, body.get("host"),
                        skew, against)

    def try_take(self, name: str) -> Lease | None:
        """Lease `name` for ttl_s; None while another holder's lease is live.

        A claim that exists is taken over (compare-and-swap on the generation observed) only when
        we have seen it unchanged for ttl_s, when it is unreadable, or when it is our own owner's
        and its process is provably gone."""
        url = self.url(name)
        for _ in range(3):  # a claim deleted between our create and our read: try again
            now, t = self.clock(), self.mono()
            nonce = uuid.uuid4().hex
            body = self._body(name, nonce, now, now)
            st = storage.create_if_absent_stat(url, body)
            if st is not None:
                self.forget(name)
                return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now, t, fresh=True)
            # Stat first, then read: if the claim changes in between, our CAS on the older
            # generation fails, so we never act on a generation newer than the one we judged.
            cur_st = storage.stat(url)
            if cur_st is None:
                continue
            cur = self._claim_body(name, url, cur_st)
            if cur is None:
                continue
            failed = self.failed_attempts(cur)
            if cur.get("released"):
                log.info("taking %s, handed back after %d failed attempt(s)", name, failed)
            elif not cur:
                log.warning("claim %s is unreadable; taking it over", url)
            elif self.expired(name, cur_st.generation):
                log.info("taking over %s: its lease stayed unchanged for %.0f s (ttl)", name, self.ttl_s)
            elif cur.get("owner") != self.owner or not self.process_gone(cur):
                return None
            else:
                log.info("taking back %s, leased by an earlier process of this owner (%s, pid %s) that is gone",
                         name, self.owner, cur.get("pid"))
            t = self.mono()
            body = self._body(name, nonce, now, now, attempt=failed + 1)
            st = storage.replace_if_generation_stat(url, body, cur_st.generation)
            if st is None:
                return None
            self.forget(name)
            return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now, t, failed + 1)
        return None

    def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it was lost (stolen or deleted). Updates lease in place."""
        now, t = self.clock(), self.mono()
        nonce = uuid.uuid4().hex
        body = self._body(lease.name, nonce, now, lease.taken_at or now, lease.attempt)
        st = storage.replace_if_generation_stat(self.url(lease.name), body, lease.generation)
        if st is None:
            return False
        lease.nonce, lease.generation, lease.expires_at, lease.written_mono = nonce, st.generation, now + self.ttl_s, t
        return True

    def try_create(self, name: str) -> Lease | None:
        """Lease `name` only if nobody holds a claim on it: one request, no contention handling
        (for a walk that learns claims from listings)."""
        now, t = self.clock(), self.mono()
        nonce = uuid.uuid4().hex
        st = storage.create_if_absent_stat(self.url(name), self._body(name, nonce, now, now))
        if st is None:
            return None
        self.forget(name)
        return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now, t, fresh=True)

    @staticmethod
    def failed_attempts(claim: dict) -> int:
        """How many attempts on the chunk a claim says failed: a released marker counts them; a
        live or expired lease's own attempt failed if we take it over; unreadable: 0."""
        try:
            return max(0, int(claim.get("attempt", 0 if claim.get("released") or not claim else 1)))
        except (TypeError, ValueError):
            return 0

    def released(self, name: str, st: storage.Stat) -> bool:
        """Is the claim on `name`, as listed (st), a released marker (a chunk handed back
        unfinished: free at once)? Claims smaller than RELEASED_MIN_SIZE are not (no request);
        others are read once per generation (cached). False if it is gone."""
        if st.size < RELEASED_MIN_SIZE:
            return False
        cur = self._claim_body(name, self.url(name), st)
        return bool(cur and cur.get("released"))

    def take_over(self, name: str, generation: str) -> Lease | None:
        """Compare-and-swap the claim at `generation`, which the caller has seen expire
        (expired(name, generation)) or found released: one request (plus one read of the claim
        for its attempt count, unless this generation was read already); None if it changed
        meanwhile."""
        now, t = self.clock(), self.mono()
        cur = self._claim_body(name, self.url(name), storage.Stat(generation, 0, None))
        if cur is None:
            return None
        failed = self.failed_attempts(cur)
        nonce = uuid.uuid4().hex
        body = self._body(name, nonce, now, now, attempt=failed + 1)
        st = storage.replace_if_generation_stat(self.url(name), body, generation)
        if st is None:
            return None
        if cur.get("released"):
            log.info("took %s, handed back after %d failed attempt(s)", name, failed)
        else:
            log.info("took over %s: its lease stayed unchanged for %.0f s (ttl)", name, self.ttl_s)
        self.forget(name)
        return Lease(name, self.owner, nonce, st.generation, now + self.ttl_s, now, t, failed + 1)

    def leased(self) -> dict[str, storage.Stat]:
        """{chunk name: Stat of its claim} of every claim (live, expired or released), from one
        listing (one request per 1,000 claims); each generation is observed for expiry."""
        out = {}
        for n, st in storage.list_stats(self.dir_url).items():
            if n.endswith(".json") and st is not None:
                out[n[: -len(".json")]] = st
                self.observe(n[: -len(".json")], st.generation)
        return out

    def release(self, lease: Lease, failed_attempts: int | None = None, committed: bool = False) -> None:
        """Best effort: delete the claim if it is still the one we wrote. Never raises.

        committed=True (the chunk object exists): one conditional DELETE without a stat first;
        where the precondition is not enforced (the emulator) it may delete a newer claim of a
        host that took over, which does no harm since the chunk is done.

        failed_attempts (a chunk handed back unfinished): keep the claim as a released marker
        that any host may take at once and that carries the number of failed attempts, so the
        next holder's attempt number counts on (a graceful stop passes lease.attempt - 1)."""
        try:
            if failed_attempts is None:
                storage.delete(self.url(lease.name), if_generation=lease.generation, check_first=not committed)
                return
            now = self.clock()
            body = self._body(lease.name, uuid.uuid4().hex, now, lease.taken_at or now, failed_attempts, released=True)
            if storage.replace_if_generation_stat(self.url(lease.name), body, lease.generation) is None:
                log.info("the claim on %s changed meanwhile; left it as it is", lease.name)
        except Exception as e:  # it expires on its own
            log.warning("could not release the claim on %s: %s", lease.name, e)

    def drop(self, name: str) -> None:
        """Delete whatever claim `name` has, ours or not: its chunk object exists (stored by a backup
        copy, kdgen.worker.feeder), so no holder needs it; deleting it is how the holder learns to stop.
        Never raises."""
        try:
            storage.delete(self.url(name))
        except Exception as e:  # the holder then finds the chunk stored at its own commit
            log.warning("could not delete the claim on %s: %s", name, e)

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

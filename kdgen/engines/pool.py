"""The request pool that keeps an engine full (the engine contract and the types it uses are in
kdgen.engines.base). The job's worker loop (kdgen.worker.loop) and the Python API (kdgen.api)
both run their requests through `pump`; the loop adds leases, partial saves and commits around
it, the API only collects results. This module imports no engine.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from typing import Callable, Hashable, Protocol

from kdgen.engines.base import Engine, EngineRequest, Finished, Request


def in_flight_target(c, engine: Engine) -> int:
    """Requests to keep queued: GEN_BATCH_SIZE, or twice what the engine runs at once, so that a
    finished sequence is replaced from the engine's own waiting queue, not after our next step."""
    return c.gen_batch_size or 2 * engine.max_num_seqs


def request_seed(seed: int, stem: str, row_idx: int) -> int:
    """The sampling seed of one row's request, from (SEED, input file stem, row): a chunk made again
    (a resume, a tail copy, another host) draws the same completions. vLLM seeds sample i of a
    request with seed + i (parallel_sampling), so samples differ and are reproducible too."""
    digest = hashlib.blake2b(f"{seed}:{stem}:{row_idx}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")  # < 2**56: seed + sample index stays in int64


class Source(Protocol):
    def take(self, room: int, idle: bool) -> list[Request] | None:
        """Up to `room` requests to send now ([] if none is ready: the pool steps what it holds,
        or, when `idle`, the source may wait a little); None once nothing more will come."""


_REQUEST_IDS = itertools.count()  # unique in the process: a reused engine never mixes up two pools


class RequestPool:
    """Keeps up to `target` requests in one engine and remembers, per request, the caller's key
    and when it was sent, and when any request last finished (read by the progress watchdog from
    another thread, hence the lock)."""

    def __init__(self, engine: Engine, target: int, refill: int | None = None):
        self.engine = engine
        self.target = max(1, target)
        # Refill in batches: one enqueue per finished request costs more than it saves.
        self.refill = refill if refill is not None else max(1, self.target // 8)
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[Hashable, float]] = {}  # request id -> (key, time sent)
        self.last_progress = time.monotonic()  # last finish, or when the pool last became busy

    @property
    def idle(self) -> bool:
        return not self._sent

    def __len__(self) -> int:
        return len(self._sent)

    def room(self) -> int:
        busy = self.engine.num_unfinished()
        room = self.target - busy
        return 0 if room < self.refill and busy > 0 else max(room, 0)

    def send(self, requests: list[Request]) -> None:
        if not requests:
            return
        now = time.monotonic()
        batch = []
        with self._lock:
            if not self._sent:
                self.last_progress = now
            for r in requests:
                rid = str(next(_REQUEST_IDS))
                self._sent[rid] = (r.key, now)
                batch.append(EngineRequest(rid, r.token_ids, r.max_tokens, r.messages, r.seed))
        self.engine.add_many(batch)

    def step(self) -> list[tuple[Hashable, Finished]]:
        """Advance the engine once; (key, Finished) of the requests that finished. Raises
        EngineError when the engine died (the keys in flight stay until `lose_all`)."""
        out = []
        finished = self.engine.step()
        with self._lock:
            for f in finished:
                sent = self._sent.pop(f.request_id, None)
                if sent is not None:  # else: aborted by an earlier stop
                    out.append((sent[0], f))
            if finished:
                self.last_progress = time.monotonic()
        return out

    def keys(self) -> list[Hashable]:
        """The keys in flight (a snapshot, safe from any thread)."""
        with self._lock:
            return [k for k, _ in self._sent.values()]

    def oldest(self) -> tuple[Hashable, float] | None:
        """(key, seconds since it was sent) of the oldest request in flight."""
        with self._lock:
            if not self._sent:
                return None
            key, t = min(self._sent.values(), key=lambda kt: kt[1])
        return key, time.monotonic() - t

    def stalled_s(self) -> float:
        """Seconds without a finished request while requests were in flight (0 when idle)."""
        with self._lock:
            return 0.0 if not self._sent else time.monotonic() - self.last_progress

    def lose_all(self, new_engine=None) -> list[Hashable]:
        """The engine died: forget its requests (optionally switch to a new engine); their keys."""
        with self._lock:
            lost = [k for k, _ in self._sent.values()]
            self._sent.clear()
        if new_engine is not None:
            self.engine = new_engine
        return lost

    def abort_keys(self, match: Callable[[Hashable], bool]) -> int:
        """Drop the requests in flight whose key matches (their chunk was stored elsewhere): the
        engine stops them where it can (`abort`), and a late result is ignored. How many."""
        with self._lock:
            rids = [rid for rid, (key, _) in self._sent.items() if match(key)]
            for rid in rids:
                del self._sent[rid]
        if rids:
            self.engine.abort(rids)
        return len(rids)

    def abort(self) -> list[Hashable]:
        """Stop: drop what is in flight (an engine that outlives the job comes back empty)."""
        lost = self.lose_all()
        self.engine.abort_all()
        return lost


def pump(pool: RequestPool, source: Source, on_finished: Callable[[Hashable, Finished], None],
         tick: Callable[[], None] = lambda: None) -> None:
    """The request loop: keep the pool full from `source`, step the engine, hand each finished
    request to `on_finished`, call `tick` after every step (or idle wait). Returns once the source
    is exhausted and nothing is in flight; exceptions (EngineError, a tick's stop) propagate."""
    while True:
        requests = source.take(pool.room(), pool.idle)
        if requests:
            pool.send(requests)
        elif requests is None and pool.idle:
            return
        if pool.idle:
            tick()
            continue
        for key, f in pool.step():
            on_finished(key, f)
        tick()


class ListSource:
    """A fixed list of requests (the Python API)."""

    def __init__(self, requests: list[Request]):
        self.requests, self.next = requests, 0

    def take(self, room: int, idle: bool) -> list[Request] | None:
        if self.next >= len(self.requests):
            return None
        batch = self.requests[self.next:self.next + max(room, 0)]
        self.next += len(batch)
        return batch

"""Chunk leases: the protocol in one process, races between processes, and lost replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from kdgen import storage
from kdgen.fleet.heartbeat import Heartbeat
from kdgen.fleet.leases import ClaimStore

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One racing process: announce "ready", wait for "go" on stdin, try to take every name, print the winners.
WORKER = r"""
import json, random, sys
from kdgen import storage
from kdgen.fleet.leases import ClaimStore
cfg = json.loads(sys.argv[1])
store = ClaimStore(cfg["out"], cfg["owner"], ttl_s=cfg["ttl"])
names = list(cfg["names"])
random.Random(cfg["seed"]).shuffle(names)
storage.list_names(store.dir_url)  # open the connection before the start line
if cfg.get("prime"):  # look at every claim once: expiry counts from a reader's first sight
    assert not [n for n in names if store.try_take(n) is not None]
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps([n for n in names if store.try_take(n) is not None]), flush=True)
"""


def race(out: str, names: list[str], workers: int = 6, ttl: float = 600.0, orders: int = 2,
         prime: bool = False) -> list[list[str]]:
    """Start `workers` processes, release them together, return each one's list of taken names.
    With prime, each looks at every claim first and the race starts ttl seconds later."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(
            {"out": out, "owner": f"worker-{i}", "ttl": ttl, "names": names, "seed": i % orders, "prime": prime})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in range(workers)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        if prime:
            time.sleep(ttl + 0.2)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            results.append(json.loads(p.stdout.readline()))
            assert p.wait(timeout=60) == 0
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(params=["local", "gs"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("gcs_server")
    return server.url(f"out-{uuid.uuid4().hex[:10]}")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_take_renew_steal_release(out):
    clock = Clock()
    a = ClaimStore(out, "A", ttl_s=10, clock=clock, mono=clock)
    b = ClaimStore(out, "B", ttl_s=10, clock=clock, mono=clock)
    la = a.try_take("c1")
    assert la is not None and la.owner == "A" and la.expires_at == clock.t + 10
    assert b.try_take("c1") is None  # live lease of another owner
    clock.t += 6
    g = la.generation
    assert a.renew(la) and la.generation != g and la.expires_at == clock.t + 10
    clock.t += 6
    assert b.try_take("c1") is None  # renewed, so still live (B sees the new generation from now)
    clock.t += 9.5
    assert b.try_take("c1") is None  # unchanged for 9.5 s of B's clock: not yet
    clock.t += 0.5
    lb = b.try_take("c1")  # unchanged for the ttl: expired, stolen
    assert lb is not None and lb.owner == "B"
    assert not a.renew(la)  # A lost it
    a.release(la)  # not ours any more: kept
    body = json.loads(storage.read_bytes(b.url("c1")))
    assert body["owner"] == "B" and body["nonce"] == lb.nonce and body["expires_at"] == clock.t + 10
    assert [d["name"] for d in a.list_leases()] == ["c1"]
    b.release(lb)
    assert not storage.exists(b.url("c1")) and a.list_leases() == []
    assert a.try_take("c1") is not None  # free again


def test_same_owner_takes_back_and_corrupt_claims(out):
    clock = Clock()
    first = ClaimStore(out, "host-0", ttl_s=100, clock=clock)
    old = first.try_take("c2")
    restarted = ClaimStore(out, "host-0", ttl_s=100, clock=clock)  # same owner id after a restart
    new = restarted.try_take("c2")
    assert new is not None and new.generation != old.generation
    assert not first.renew(old)  # the stale process's lease is gone
    storage.write_bytes(storage.join(out, "_claims", "c3.json"), b"{not json")
    storage.write_bytes(storage.join(out, "_claims", "c4.json"), b"[1, 2]")
    leases = {d["name"]: d for d in first.list_leases()}
    assert leases["c3"] == {"name": "c3", "corrupt": True} and leases["c4"]["corrupt"]
    assert leases["c2"]["owner"] == "host-0" and leases["c2"]["taken_at"] == clock.t
    assert ClaimStore(out, "other", clock=clock).try_take("c3") is not None  # unreadable: taken over


def test_race_every_chunk_exactly_once(out):
    names = [f"shard_{i // 50:03d}_rows_{i % 50 * 100:07d}_{i % 50 * 100 + 100:07d}" for i in range(200)]
    results = race(out, names)
    taken = [n for r in results for n in r]
    assert sorted(taken) == sorted(names)  # every chunk once, none twice
    assert sum(1 for r in results if r) >= 2  # it was a race
    owners = {d["name"]: d["owner"] for d in ClaimStore(out, "status").list_leases()}
    for i, r in enumerate(results):
        assert all(owners[n] == f"worker-{i}" for n in r)


def test_race_expired_stolen_once_live_never(out):
    """Racers that have watched every claim for the ttl: the ones left unchanged (a dead holder)
    are each stolen by exactly one racer; the ones a live holder renews meanwhile by none."""
    now = time.time()
    dead = ClaimStore(out, "dead", ttl_s=60)
    alive = ClaimStore(out, "alive", ttl_s=3600)
    expired = [f"exp_{i:03d}" for i in range(30)]
    live = [f"live_{i:03d}" for i in range(30)]
    assert all(dead.try_take(n) for n in expired)
    held = [alive.try_take(n) for n in live]
    hb = Heartbeat(alive, interval_s=0.3)  # the live holder renews all the time
    for lease in held:
        hb.add(lease)
    try:
        results = race(out, expired + live, orders=1, ttl=3.0, prime=True)  # every name contested
    finally:
        hb.stop()
    taken = sorted(n for r in results for n in r)
    assert taken == expired  # each expired lease stolen by exactly one racer; no live one
    assert all(json.loads(storage.read_bytes(alive.url(n)))["owner"] == "alive" for n in live)
    assert all(json.loads(storage.read_bytes(alive.url(n)))["owner"].startswith("worker-") for n in expired)
    assert all(json.loads(storage.read_bytes(alive.url(n)))["renewed_at"] >= now for n in expired)


def test_heartbeat_renews_and_reports_loss(out):
    a = ClaimStore(out, "A", ttl_s=0.6)
    lease = a.try_take("hb")
    hb = Heartbeat(a)
    try:
        hb.add(lease)
        g0 = lease.generation
        time.sleep(1.3)  # two ttl's: without renewals it would have expired
        assert lease.generation != g0 and lease.expires_at > time.time()
        assert ClaimStore(out, "B", ttl_s=0.6).try_take("hb") is None
        assert hb.lost() == set() and hb.held() == ["hb"]
        # A clock that runs ahead does not make a live lease look expired.
        assert ClaimStore(out, "B", ttl_s=0.6, clock=lambda: time.time() + 600).try_take("hb") is None
        # B takes it over anyway (as after a pause of A longer than the ttl); A's next renewal fails.
        thief = storage.replace_if_generation(a.url("hb"), json.dumps({"owner": "B"}).encode(),
                                              storage.stat(a.url("hb")).generation)
        assert thief
        deadline = time.time() + 3
        while "hb" not in hb.lost() and time.time() < deadline:
            time.sleep(0.02)
        assert hb.lost() == {"hb"} and hb.held() == []
        assert json.loads(storage.read_bytes(a.url("hb")))["owner"] == "B"
        other = a.try_take("hb2")
        hb.add(other)
        hb.remove("hb2")
        assert hb.held() == []
    finally:
        hb.stop()


def test_lost_replies_still_owned(gcs_server, monkeypatch):
    """Create/CAS succeed upstream but their replies become 503s: gcsfs retries and gets 412.
    The writer must still own its claim and its output, and nobody else may own them too."""
    from tests.proxy import FaultProxy

    out = gcs_server.url(f"lost-{uuid.uuid4().hex[:8]}")
    names = ["c0", "c1", "c2"]
    with FaultProxy(gcs_server.endpoint, mode="drop_reply") as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        a = ClaimStore(out, "A", ttl_s=600)
        leases, created = {}, {}

        def work(n):
            lease = a.try_take(n)
            leases[n] = lease
            assert a.renew(lease)
            created[n] = storage.create_if_absent(storage.join(out, n + ".jsonl"), b'{"row": 1}\n')

        ts = [threading.Thread(target=work, args=(n,)) for n in names]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert all(leases[n] is not None for n in names) and all(created.values())
        key = out.split("/", 3)[3]  # the object-name prefix inside the bucket
        for n in names:  # the faults really happened: one per create and per compare-and-swap
            assert {f"create {key}/_claims/{n}.json", f"replace {key}/_claims/{n}.json",
                    f"create {key}/{n}.jsonl"} <= set(proxy.dropped)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    b = ClaimStore(out, "B", ttl_s=600)
    for n in names:
        assert b.try_take(n) is None  # A's lease is live and A's
        assert storage.create_if_absent(storage.join(out, n + ".jsonl"), b'{"row": 1}\n') is False
        assert storage.stat(a.url(n)).generation == leases[n].generation
        assert a.renew(leases[n])  # A's view of its generation is right
        a.release(leases[n])
        assert not storage.exists(a.url(n))


def test_each_lease_is_renewed_on_its_own_schedule(tmp_path):
    """A lease is renewed interval_s after its own last write, not on a beat shared by all: a lease
    taken just before a beat is not renewed at once (fewer requests per chunk)."""
    a = ClaimStore(str(tmp_path / "out"), "A", ttl_s=6.0)
    hb = Heartbeat(a, interval_s=2.0)  # checks every 0.5 s
    try:
        t0 = time.monotonic()
        old = a.try_take("early")
        hb.add(old)
        time.sleep(1.2)
        new = a.try_take("late")
        hb.add(new)
        g_old, g_new = old.generation, new.generation
        time.sleep(max(0.0, 2.8 - (time.monotonic() - t0)))
        # the early lease was due at 2.0 s (renewed by ~2.5 s), the late one is due at 3.2 s
        assert old.generation != g_old and new.generation == g_new
        time.sleep(1.2)
        assert new.generation != g_new
    finally:
        hb.stop()

"""The feeder's walk at fleet scale (issue 12), without an engine: what it costs in storage requests
to skip finished chunks, to share contended ones, and to wait for chunks other hosts hold."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen.fleet import leases as claims_mod
from kdgen import storage
from kdgen.worker import runner
from kdgen.records import chunk_object
from kdgen.fleet.heartbeat import Heartbeat
from kdgen.fleet.leases import ClaimStore
from kdgen.worker.custody import Custodian
from kdgen.worker.feeder import Feeder
from kdgen.worker.handoff import Handoff
from kdgen.prompts import PromptBuilder
from tests.conftest import job_config

pytestmark = pytest.mark.timeout(300)

OUT_OPS = ("exists", "stat", "read_bytes", "write_bytes", "create", "replace", "delete", "list_stats")


class CountingStore(storage.LocalStore):
    """The local store, counting the calls on OUT (the corpus is read through open_input, not counted)."""

    def __init__(self):
        self.calls = collections.Counter()
        self.lock = threading.Lock()


def _counted(name: str):
    real = getattr(storage.LocalStore, name)

    def method(self, *a, **k):
        with self.lock:
            self.calls[name] += 1
        return real(self, *a, **k)

    return method


for _name in OUT_OPS:
    setattr(CountingStore, _name, _counted(_name))


@pytest.fixture()
def counted():
    with storage.using(CountingStore(), "file") as store:
        yield store.calls


def corpus(tmp_path, files: int, rows: int) -> str:
    data = tmp_path / "c"
    data.mkdir()
    for f in range(files):
        pq.write_table(pa.table({"text": [f"file {f} row {i} of the river" for i in range(rows)]}),
                       str(data / f"part-{f:03d}.parquet"), row_group_size=max(rows, 1))
    return str(data)


class BusyEngine(Custodian):
    """The stand-in engine never runs dry, so these hosts make no backup copies (the tail has
    its own tests below, on the real worker loop)."""

    def idle(self) -> bool:
        return False


class Host:
    """One host's feeder, plus a stand-in for the engine and committer: every chunk queued is
    committed (an empty chunk object) and its lease released through its custody, as the real
    committer does."""

    def __init__(self, c, tokenizer, order, owner: str, ttl: float):
        self.claims = ClaimStore(c.output_path, owner, ttl_s=ttl)
        self.heartbeat = Heartbeat(self.claims)
        self.q = Handoff(maxsize=3)
        custodian = BusyEngine(c.output_path, self.claims, self.heartbeat, saver=None)
        self.feeder = Feeder(c, order, PromptBuilder(c, tokenizer, 512), self.claims, custodian, self.q,
                             threading.Event())
        self.committed: list[str] = []
        self.worker = threading.Thread(target=self.commit_all, daemon=True)

    def commit_all(self):
        # Always ready for the next chunk, as a worker loop with an idle engine asks (feed_me).
        while self.feeder.feed_me() or (work := self.q.get()) is not None:
            created = chunk_object.commit_chunk(self.feeder.c, work.chunk, [], [])
            if created:
                self.committed.append(work.chunk.name)
            work.custody.start_feeding()
            work.custody.complete()
            work.custody.committed(created)  # deletes the lease

    def start(self) -> "Host":
        self.worker.start()
        self.feeder.start()
        return self

    def join(self, timeout: float = 120) -> None:
        self.feeder.join(timeout)
        self.worker.join(timeout)
        self.heartbeat.stop()
        assert not self.feeder.is_alive() and self.feeder.error is None, self.feeder.error


def test_skipping_1000_finished_chunks_costs_a_listing_not_1000_probes(tmp_path, tokenizer, tiny_model, counted):
    data, out = corpus(tmp_path, files=10, rows=101), str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=1)
    plan = runner.prepare(c, {"text": "string"})
    order = plan.chunks  # what this host saw as unfinished when it started
    # Meanwhile other hosts finished 1,000 of the 1,010 chunks, among them all the first ones of our order.
    for ch in order[:1000]:
        chunk_object.commit_chunk(c, ch, [], [])
    counted.clear()
    host = Host(c, tokenizer, order, "me:0", ttl=30).start()
    host.join()
    assert sorted(host.committed) == sorted(ch.name for ch in order[1000:])
    requests = sum(counted.values())
    # One finished chunk taken and handed back (create, stat, delete), one listing of OUT, then per
    # remaining chunk a listing of the claims, a create, a stat, a commit and a release.
    assert counted["list_stats"] <= 1 + 10 + 2 and counted["exists"] + counted["stat"] <= 1 + 10 + 2, counted
    assert requests <= 3 + 1 + 10 * 5 + 5, counted


def test_hosts_that_share_one_order_share_its_chunks_at_bounded_cost(tmp_path, tokenizer, tiny_model, counted):
    """Worst case for contention: four hosts with the same order, all starting at once."""
    data, out = corpus(tmp_path, files=4, rows=50), str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=1)
    plan = runner.prepare(c, {"text": "string"})
    counted.clear()
    hosts = [Host(c, tokenizer, plan.chunks, f"h{i}:0", ttl=30) for i in range(4)]
    for h in hosts:
        h.start()
    for h in hosts:
        h.join()
    committed = [n for h in hosts for n in h.committed]
    assert sorted(committed) == sorted(ch.name for ch in plan.chunks)  # each once
    assert sum(bool(h.committed) for h in hosts) >= 2  # it was shared
    per_chunk = sum(counted.values()) / len(plan.chunks)
    assert per_chunk <= 8, (per_chunk, counted)


def test_a_host_with_only_leased_chunks_left_waits_and_exits_when_they_are_done(tmp_path, tokenizer, tiny_model):
    data, out = corpus(tmp_path, files=1, rows=6), str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=1, lease_ttl_s=5)
    plan = runner.prepare(c, {"text": "string"})
    live = ClaimStore(out, "busy:1", ttl_s=1.0)  # another host, alive: it renews every 1/3 s
    live_hb = Heartbeat(live)
    held = [live.try_take(ch.name) for ch in plan.chunks[:3]]
    for lease in held:
        live_hb.add(lease)
    dead = ClaimStore(out, "dead:2", ttl_s=1.0)  # a host that died holding two chunks
    for ch in plan.chunks[3:5]:
        assert dead.try_take(ch.name) is not None
    c1 = dataclasses.replace(c, lease_ttl_s=1.0)  # (below the CLI's 5 s minimum: a test clock)
    host = Host(c1, tokenizer, plan.chunks, "me:0", ttl=1.0).start()
    t0 = time.monotonic()
    while len(host.committed) < 3:  # the free chunk, then the dead host's two once unchanged for the ttl
        assert time.monotonic() - t0 < 20, host.committed
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 1.0 - 0.2
    assert sorted(host.committed) == sorted(ch.name for ch in plan.chunks[3:])
    assert host.feeder.is_alive() and host.feeder.phase == 3  # the live host's chunks: it waits
    time.sleep(1.5)  # longer than the ttl: still not taken, the live host renews
    assert len(host.committed) == 3
    for lease in held:  # the live host finishes its chunks
        ch = next(ch for ch in plan.chunks if ch.name == lease.name)
        chunk_object.commit_chunk(c, ch, [], [])
        live_hb.remove(lease.name)
        live.release(lease, committed=True)
    done_at = time.monotonic()
    host.join(timeout=10)
    assert time.monotonic() - done_at < 1.0  # within a poll (ttl/40) or so of the last commit
    live_hb.stop()
    assert sorted(storage.list_names(out)) == sorted([ch.name + ".jsonl" for ch in plan.chunks] + ["_job.json"])


def test_a_chunk_handed_back_is_taken_at_once_with_its_attempts_counted(tmp_path, tokenizer, tiny_model, counted):
    """A released marker (a chunk handed back unfinished, e.g. on SIGTERM) is free at once, not a
    live lease to wait out; its taker's attempt counts on, and of the waiting host's claim reads
    only the marker's is read (live claims are told apart by their listed size)."""
    data, out = corpus(tmp_path, files=1, rows=4), str(tmp_path / "out")
    c = dataclasses.replace(job_config(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=1),
                            lease_ttl_s=30.0)
    plan = runner.prepare(c, {"text": "string"})
    live = ClaimStore(out, "busy:1", ttl_s=30.0)  # another host, alive, holding two chunks
    held = [live.try_take(ch.name) for ch in plan.chunks[:2]]
    gone = ClaimStore(out, "preempted:2", ttl_s=30.0)
    lease = gone.try_take(plan.chunks[2].name)
    lease.attempt = 3  # two attempts on it failed before this holder
    gone.release(lease, failed_attempts=lease.attempt - 1)  # SIGTERM: handed back, not a failure
    assert storage.stat(gone.url(lease.name)).size >= claims_mod.RELEASED_MIN_SIZE
    chunk_object.commit_chunk(c, plan.chunks[3], [], [])  # done by someone else
    counted.clear()
    taken = []
    real_take_over = ClaimStore.take_over

    def take_over(self, name, generation):
        got = real_take_over(self, name, generation)
        taken.append(got)
        return got

    ClaimStore.take_over = take_over
    try:
        # Its walk finds a done chunk first, so it learns the rest from listings (phases 2 and 3).
        order = [plan.chunks[3], *plan.chunks[:3]]
        host = Host(c, tokenizer, order, "me:0", ttl=30.0).start()
        t0 = time.monotonic()
        while not host.committed:
            assert time.monotonic() - t0 < 10, "the handed-back chunk was not taken"
            time.sleep(0.05)
    finally:
        ClaimStore.take_over = real_take_over
    assert host.committed == [plan.chunks[2].name] and time.monotonic() - t0 < 5  # not after the 30 s ttl
    assert [t.attempt for t in taken] == [3] and host.feeder.phase >= 2
    assert counted["read_bytes"] <= 2, counted  # the marker's body, not the live claims'
    for ls in held:  # the live host finishes; the waiting host exits
        chunk_object.commit_chunk(c, next(ch for ch in plan.chunks if ch.name == ls.name), [], [])
        live.release(ls, committed=True)
    host.join(timeout=10)
    assert host.committed == [plan.chunks[2].name]


def _fleet(tmp_path, *flags):
    """bench/fleet_sim.py in-process: the real runner/feeder/claims/commit code of every host, a
    stand-in engine that sleeps per row, local storage with latency; durations x 0.01."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "fleet_sim.py")
    spec = importlib.util.spec_from_file_location("fleet_sim", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    return sim.run_fleet(sim.parse_args(["--hosts", "4", "--chunks", "24", "--slow", "6", "--scale", "0.01",
                                         "--tmp", str(tmp_path), *flags]))


def test_idle_hosts_copy_a_slow_hosts_last_chunks_and_each_chunk_is_stored_once(tmp_path):
    """The tail (kdgen.worker.feeder): host 0 is 6x slower, so its last chunks would keep three idle hosts
    waiting for up to two of its 600 s chunk-times. With TAIL_BACKUPS the idle hosts copy them,
    the first copy stored wins, host 0 drops its own, and every chunk is still stored exactly once."""
    on = _fleet(tmp_path)
    off = _fleet(tmp_path, "--no-tail-backups")
    assert on["exact"] and off["exact"], (on["errors"], off["errors"])  # each chunk once, all its rows
    assert off["backups_stored"] == 0 and on["backups_stored"] >= 1, on
    assert on["lost_or_dropped"] >= 1, on  # the holder dropped its copy (or a copy lost its race)
    # The job ends about when the fast hosts run dry, not when the slow host would have finished.
    assert on["job_s"] < off["job_s"] - 200, (on["job_s"], off["job_s"])
    assert on["idle"] < off["idle"], (on["idle"], off["idle"])


def test_the_fleet_simulation_spread_over_processes_stores_each_chunk_once(tmp_path):
    """fleet_sim --procs 2: hosts run as threads of two child processes against one output
    directory (local create-if-absent and compare-and-swap across processes); their reports are
    merged, and every chunk is stored once with all its rows."""
    r = _fleet(tmp_path, "--procs", "2", "--chunks", "16", "--scale", "0.004")
    assert r["exact"], r["errors"]
    assert r["procs"] == 2 and r["hosts"] == 4
    assert r["idle_or_wasted"] >= r["idle"]  # work thrown away only adds to the idle time
    assert r["req_per_chunk"] >= 4  # lease, check, object, release: each process's requests are counted

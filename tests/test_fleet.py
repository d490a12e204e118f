"""Fleet faults: preemption keeps finished rows, a poison row is isolated, a hung engine trips the
watchdog, a failed commit hands its lease back (issue 11, issue 9 item 6).

The protocol's faults run on the fake engine (FAKE_ENGINE: scripted latency, deaths and stalls, no
model); what only vLLM shows runs on the real CPU engine: compile caches, and the three-host chaos
on gs:// (kill -9 of whole hosts, engines and all)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage, tiny
from kdgen.corpus import dataset
from kdgen.fleet import partial
from kdgen.worker import runner
from kdgen.views import audit, status
from kdgen.records import chunk_object, naming
from kdgen.prompts import load_tokenizer
from tests.conftest import PYTHON, job_config
from tests.test_faults import SCRIPT, job_env

MARKER = "Zyx Qwv Zyx Qwv Zyx"


def marked_corpus(d: str, rows: int, marked: list[int], seed: int = 11) -> str:
    """One parquet file of `rows` rows; rows in `marked` start with MARKER."""
    tiny.make_corpus(d, num_files=1, rows_per_file=rows, seed=seed)
    path = os.path.join(d, "shard-00000.parquet")
    t = pq.read_table(path)
    texts = t.column("text").to_pylist()
    for r in marked:
        texts[r] = MARKER + " " + texts[r]
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts)), path, row_group_size=32)
    return d


def marker_ids(model: str, data: str, marked: list[int]) -> str:
    """The token ids that start every marked row's prompt and no other's (FAKE_ENGINE die_on / stall_on)."""
    tok = load_tokenizer(model)
    texts = pq.read_table(os.path.join(data, "shard-00000.parquet")).column("text").to_pylist()
    ids = [tok(t, add_special_tokens=False)["input_ids"][:32] for t in texts]
    n = len(tok(MARKER, add_special_tokens=False)["input_ids"]) - 1  # the last may merge with what follows
    marker = ids[marked[0]][:n]
    for r, row_ids in enumerate(ids):
        assert (row_ids[:n] == marker) == (r in marked)
    return ",".join(map(str, marker))


def segments(out: str, chunk: str) -> dict[str, list[dict]]:
    """{segment name: row entries} of a chunk's partial progress."""
    d = partial.chunk_dir(out, chunk)
    found = {}
    for name in storage.list_names(d):
        try:
            lines = storage.read_bytes(storage.join(d, name)).splitlines()
        except FileNotFoundError:  # deleted since the listing (the job cleaned up after a commit)
            continue
        found[name] = [json.loads(x) for x in lines[1:]]
    return found


def saved_rows(out: str, chunk: str) -> dict[int, dict]:
    rows = {}
    found = segments(out, chunk)  # one listing: a second one may miss a segment the first had
    for name in sorted(found):
        for r in found[name]:
            rows.setdefault(r["row_idx"], r)
    return rows


def claim(out: str, chunk: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "_claims", chunk + ".json")))


def chunk_records(out: str, chunk: str) -> dict[int, dict]:
    records, _ = chunk_object.read_chunk_object(storage.join(out, chunk + ".jsonl"))  # checks the object's hash
    return {r["row_idx"]: r for r in records}


# A fake engine that takes ~1 ms per generated token: rows of a chunk finish one after another,
# so that signals and kills land mid-chunk.
FAKE_SLOW = "token_s=0.001"


def test_preemption_and_kill_keep_finished_rows(tiny_model, tmp_path):
    """SIGTERM mid-chunk saves every finished row; a kill -9 keeps what the last periodic save had;
    the rerun reuses all of them (summary line) and the chunk is stored exactly once."""
    data = marked_corpus(str(tmp_path / "c"), 240, [])
    out = str(tmp_path / "out")
    chunk = dataset.chunk_name("shard-00000", 0, 240)
    settings = dict(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=240, gen_batch_size=4,
                    max_target_length=96, temperature=0.8, checkpoint_every_s=0.5, preempt_grace_s=4,
                    lease_ttl_s=60, fake_engine=FAKE_SLOW)

    # 1. SIGTERM (a real signal to this process) once some rows are saved.
    returned = threading.Event()

    def preempt():
        deadline = time.time() + 120
        while time.time() < deadline and not returned.is_set():
            try:
                saved = any(segments(out, chunk).values())
            except Exception:  # mid-write or mid-cleanup: look again (an exception here would end the thread)
                saved = False
            if saved:
                os.kill(os.getpid(), signal.SIGTERM)  # only while the job runs: else it would kill pytest
                return
            time.sleep(0.05)

    threading.Thread(target=preempt, daemon=True).start()
    try:
        with pytest.raises(runner.JobError) as e:
            runner.run(job_config(**settings))
    finally:
        returned.set()
    m = re.search(r"stopped by a signal: 0 chunks committed \(0 completed during the PREEMPT_GRACE_S=4 s grace period\); "
                  r"1 unfinished chunks were handed back, their (\d+) finished rows saved", str(e.value))
    assert m, str(e.value)
    first = saved_rows(out, chunk)
    assert 0 < len(first) == int(m.group(1)) < 240  # every finished row is in _partial
    assert claim(out, chunk)["released"] is True and claim(out, chunk)["attempt"] == 0  # not a failed attempt
    assert not storage.exists(storage.join(out, chunk + ".jsonl"))

    # 2. The bash job takes over, reuses them, and is killed -9 after a periodic save of its own.
    env = job_env(tiny_model, data, out, CHUNK_SIZE="240", GEN_BATCH_SIZE="2", MAX_TARGET_LENGTH="96",
                  TEMPERATURE="0.8", CHECKPOINT_EVERY_S="0.5", PREEMPT_GRACE_S="4", LEASE_TTL_S="60",
                  FAKE_ENGINE=FAKE_SLOW)
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(saved_rows(out, chunk)) == len(first):
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert not storage.exists(storage.join(out, chunk + ".jsonl")), \
                "the job stored the chunk before the test saw a periodic save: " + open(log_path).read()[-3000:]
            assert time.time() < deadline, "the job saved nothing"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert f"reusing {len(first)} finished rows saved by an earlier holder" in open(log_path).read()
    second = saved_rows(out, chunk)
    assert set(first) < set(second) and len(second) < 240
    assert claim(out, chunk)["attempt"] == 1 and "released" not in claim(out, chunk)  # left live by kill -9

    # 3. The rerun (here, as the same host) reuses every saved row and generates only the rest, on
    # an engine whose completions differ from the first ones' (as an unseeded vLLM's would).
    s = runner.run(job_config(**{**settings, "fake_engine": "salt=1"}))
    assert s.chunks_committed == 1 and s.rows == 240 and s.rows_reused == len(second)
    assert f"240 rows ({len(second)} reused from partial progress)" in s.line()
    records = chunk_records(out, chunk)
    for r, saved in second.items():  # other completions on the rerun's engine: equal only if reused
        assert [records[r]] == saved["records"]
    assert audit.audit(out)["ok"] and audit.audit(out)["rows_ok"] == 240
    assert not os.path.exists(partial.chunk_dir(out, chunk))  # the cache is gone once the chunk is stored
    assert not storage.exists(storage.join(out, "_claims", chunk + ".json"))


def test_poison_row_is_quarantined_and_the_rest_generated(tiny_model, tmp_path):
    """A row that kills the engine (FAKE_ENGINE die_on: every engine it reaches) is isolated after
    MAX_CHUNK_ATTEMPTS, recorded as an error row; the engine restarts in-process; every other row
    is generated; the job ends 0."""
    data = marked_corpus(str(tmp_path / "c"), 16, [5])
    out = str(tmp_path / "out")
    env = job_env(tiny_model, data, out, CHUNK_SIZE="16", GEN_BATCH_SIZE="4", MAX_CHUNK_ATTEMPTS="1",
                  ENGINE_RESTARTS="2", FAKE_ENGINE="die_on=" + marker_ids(tiny_model, data, [5]))
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "15 rows (0 reused from partial progress), 1 error rows" in r.stdout
    assert r.stderr.count("restarting the engine in") == 2
    chunk = dataset.chunk_name("shard-00000", 0, 16)
    records, errors = chunk_object.read_chunk_object(storage.join(out, chunk + ".jsonl"))
    assert sorted(x["row_idx"] for x in records) == [r for r in range(16) if r != 5]
    assert [(e["row_idx"], e["error_kind"]) for e in errors] == [(5, "quarantined")]  # in the chunk object
    report = audit.audit(out)
    assert report["ok"] and report["rows_ok"] == 15 and report["rows_failed"] == 1
    failed = report["failed_rows"][0]
    assert failed["row_idx"] == 5 and failed["error"].startswith("the engine died on this row 2 times")
    shown = subprocess.run([PYTHON, "-m", "kdgen.cli", "status", out], capture_output=True, text=True, timeout=120)
    assert "chunks with more than one attempt: 1; rows quarantined: 1" in shown.stdout, shown.stdout + shown.stderr
    assert f"{chunk}: attempt 3, done, 1 rows quarantined" in shown.stdout


def test_stalled_engine_trips_the_watchdog_and_others_finish(tiny_model, tmp_path):
    """Host 0's engine hangs on a row (FAKE_ENGINE stall_on: step() never returns, as with a
    SIGSTOPped EngineCore): its watchdog stops renewing leases, records the stall and exits 1
    naming the oldest request; host 1 finishes the job once the leases expire; audit OK. (That the
    watchdog kills a hung vLLM EngineCore: tests/test_faults.py, on the real engine.)"""
    d = str(tmp_path / "c")
    tiny.make_corpus(d, num_files=1, rows_per_file=60, seed=12)
    first = dataset.host_order(dataset.plan(d, 20, 0).chunks, 0, 2)[0]  # host 0 takes this first
    data = marked_corpus(d, 60, [first.start + 3], seed=12)
    out = str(tmp_path / "out")
    env = job_env(tiny_model, data, out, HOST_INDEX="0", NUM_HOSTS="2", LEASE_TTL_S="8", STALL_TIMEOUT_S="4",
                  FAKE_ENGINE="stall_on=" + marker_ids(tiny_model, data, [first.start + 3]))
    proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("kdgen: error: no request finished for ") and "(STALL_TIMEOUT_S=4)" in last, err[-3000:]
    assert re.search(r"oldest request: row \d+ of shard-00000_rows_\d+_\d+, sent \d+ s ago", last), last
    assert "Stopped renewing leases" in last
    assert "holds the FAKE_ENGINE stall_on marker" in err  # the hang was the engine's, on the marked row
    # The stall counts as a failed attempt of the rows in flight (for the next holder), and the
    # lease is left to expire (not released).
    died = [e for n in storage.list_names(partial.chunk_dir(out, first.name))
            for e in json.loads(storage.read_bytes(storage.join(partial.chunk_dir(out, first.name), n)).splitlines()[0])[
                "events"] if "died" in e]
    assert died and first.start + 3 in died[0]["died"] and died[0]["reason"].startswith("stalled: no request finished")
    assert claim(out, first.name)["attempt"] == 1 and "released" not in claim(out, first.name)
    s = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out, host_index=1,
                              num_hosts=2, lease_ttl_s=8, fake_engine="on"))
    assert s.chunks_committed == 3 and s.rows == 60  # host 1 did all of it, host 0's chunks once they expired
    assert audit.audit(out)["ok"]
    retried = {x["chunk"]: x["attempt"] for x in status.status(out)["chunks_retried"]}
    assert retried.get(first.name) == 2  # taken over from the expired lease: the second attempt


def test_failed_commit_hands_its_lease_back(engine, tiny_model, gcs_server, tmp_path, monkeypatch):
    """Issue 9 item 6: a commit that fails (here: the bucket refuses chunk objects) must not skip its
    release, and stopping joins the feeder before releasing every lease still held. The finished
    rows go to _partial, so the rerun generates nothing twice."""
    from tests.proxy import FaultProxy

    data = str(tmp_path / "c")
    tiny.make_corpus(data, num_files=1, rows_per_file=60, seed=13)
    out = gcs_server.url("failcommit", "out")
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=out)
    with FaultProxy(gcs_server.endpoint, mode="forbid_chunk_creates") as proxy:
        monkeypatch.setenv("KDGEN_GCS_ENDPOINT", proxy.endpoint)
        with pytest.raises(storage.StorageError, match="forbidden by the test proxy"):
            runner.run(c, engine=engine)
        monkeypatch.delenv("KDGEN_GCS_ENDPOINT")
    claims = [json.loads(storage.read_bytes(storage.join(out, "_claims", n)))
              for n in storage.list_names(storage.join(out, "_claims"))]
    assert claims and all(x.get("released") for x in claims), claims  # none waits out its TTL
    assert not [n for n in storage.list_names(out) if n.endswith(".jsonl")]
    saved = sum(len(saved_rows(out, x["name"])) for x in claims)
    s = runner.run(c, engine=engine)
    assert s.chunks_committed == 3 and s.rows == 60 and s.rows_reused == saved > 0
    assert audit.audit(out)["ok"]


@pytest.mark.engine  # vLLM engines in subprocesses
def test_data_parallel_ranks_compile_apart_and_a_corrupt_cache_is_moved_aside(tiny_model, tmp_path, caplog,
                                                                               monkeypatch):
    """Two engines compiling at once on one host (DATA_PARALLEL_SIZE=2, compilation on) each use
    their own cache under KDGEN_CACHE, and both start; the ranks split the job. Then truncated
    artifacts planted in rank 0's cache are moved aside and the start succeeds, in one line."""
    import glob

    from kdgen.config import JobConfig
    from kdgen.engines.vllm_engine import VllmEngine

    data, out, cache = str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache")
    tiny.make_corpus(data, num_files=2, rows_per_file=20, seed=7)
    env = job_env(tiny_model, data, out, DATA_PARALLEL_SIZE="2", CHUNK_SIZE="10", ENFORCE_EAGER="false",
                  KDGEN_CACHE=cache)
    for var in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CACHE_ROOT"):
        env.pop(var, None)
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "kdgen[dp0]" in r.stderr and "kdgen[dp1]" in r.stderr
    assert audit.audit(out)["ok"]
    hosts = status.status(out)["hosts"]
    assert len(hosts) == 2 and sum(h["chunks"] for h in hosts) == 4
    libs = {rank: glob.glob(os.path.join(cache, "vllm", f"dp{rank}", "torch_compile_cache", "**", "*.so"),
                            recursive=True) for rank in (0, 1)}
    assert libs[0] and libs[1], libs  # each rank compiled into its own directory

    # What a kill during compilation, or two writers, leave behind: compiled wrappers cut short.
    # (The worker that loads one dies of a bus error; the start fails.)
    planted = [p for p in libs[0] if p.endswith(".main.so")]
    for path in planted:
        os.truncate(path, 1000)
    monkeypatch.setenv("VLLM_CACHE_ROOT", os.path.join(cache, "vllm", "dp0"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-0")  # as rank 0 had it: the same cache key
    with caplog.at_level("WARNING", logger="kdgen.engines.vllm_engine"):
        eng = VllmEngine(JobConfig(model_path=tiny_model, temperature=0.0, dtype="float32", max_model_len=512))
    try:
        eng.add_many([("a", [5, 6, 7], 4)])
        done = []
        while eng.num_unfinished():
            done += eng.step()
        assert len(done[0].samples[0].token_ids) == 4
    finally:
        eng.close()
    lines = [x.getMessage() for x in caplog.records if "corrupt compile cache" in x.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert os.path.join(cache, "vllm", "dp0", "torch_compile_cache") in lines[0] and "moved" in lines[0]
    aside = glob.glob(os.path.join(cache, "vllm", "dp0", "torch_compile_cache.corrupt-*"))
    assert len(aside) == 1 and os.path.isdir(os.path.join(cache, "vllm", "dp0", "torch_compile_cache"))


@pytest.mark.engine  # vLLM engines in subprocesses
def test_three_hosts_on_gs_survive_random_kills_and_preemptions(tiny_model, gcs_server, tmp_path):
    """Three bash-job hosts on gs://, writing parquet chunk objects; kill -9 and SIGTERM hit random
    hosts, twice each, the first mid-chunk; each victim is started again at once: the audit is
    exactly once, and the rows that victims had saved are taken up by the next holders (and
    counted in their summary lines)."""
    import random

    from kdgen.fleet.leases import ClaimStore
    from kdgen.records.naming import finished_chunk_names as done_names
    from tests.test_multihost import upload_corpus

    local = str(tmp_path / "c")
    tiny.make_corpus(local, num_files=3, rows_per_file=100, seed=6)
    data, out = gcs_server.url("chaos", "corpus"), gcs_server.url("chaos", "out")
    upload_corpus(local, data)
    procs, logs, current_log = {}, [], {}

    def start(host: int) -> None:
        env = job_env(tiny_model, data, out, HOST_INDEX=str(host), NUM_HOSTS="3", CHUNK_SIZE="30",
                      GEN_BATCH_SIZE="4", MAX_TARGET_LENGTH="160", TEMPERATURE="0.8", LEASE_TTL_S="6",
                      CHECKPOINT_EVERY_S="1", PREEMPT_GRACE_S="3", OUTPUT_FILE_FORMAT="parquet",
                      STORAGE_EMULATOR_HOST=gcs_server.endpoint,
                      VLLM_CPU_OMP_THREADS_BIND=str(host % 2))
        path = tmp_path / f"host{host}-{len(logs)}.log"
        logs.append(path)
        current_log[host] = path
        with open(path, "wb") as log:
            procs[host] = subprocess.Popen(["bash", SCRIPT], env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)

    def mid_chunk_host() -> int | None:
        """A host whose current process holds a live lease on an unfinished chunk with saved rows."""
        done = done_names(out)
        by_pid = {p.pid: host for host, p in procs.items() if p.poll() is None}  # bash execs python
        for lease in ClaimStore(out, "test").list_leases():
            host = by_pid.get(lease.get("pid"))
            if (host is not None and not lease.get("released") and lease["name"] not in done
                    and storage.list_names(partial.chunk_dir(out, lease["name"]))):
                return host
        return None

    rng = random.Random(11)
    events = ["SIGTERM", "SIGKILL", "SIGTERM", "SIGKILL"]
    rng.shuffle(events)
    for host in range(3):
        start(host)
    exits, restarts = [], []

    def restart_when_gone(sig: str, host: int, proc: subprocess.Popen) -> None:
        exits.append((sig, proc.wait(timeout=120)))  # a SIGTERM'd host takes its grace period
        start(host)

    try:
        # The first fault waits for a host in the middle of a chunk with saved rows; the others
        # follow every few seconds, on such a host if there is one, else on any running host (a
        # fault during an engine start is a fault too). Every victim is started again once gone.
        deadline = time.time() + 400
        while not storage.exists(storage.join(out, "_job.json")) or mid_chunk_host() is None:
            assert time.time() < deadline, "no host got going"
            time.sleep(0.2)
        for sig in events:
            while True:
                hit = {t.host for t in restarts if t.is_alive()}  # signalled, not yet gone
                host = mid_chunk_host()
                if host is None or host in hit:
                    candidates = [h for h, p in procs.items() if p.poll() is None and h not in hit]
                    host = rng.choice(candidates) if candidates else None
                if host is not None:
                    break
                assert time.time() < deadline, "no host left to hit"
                time.sleep(0.5)
            proc = procs[host]
            if sig == "SIGKILL":
                os.killpg(proc.pid, signal.SIGKILL)  # the whole host, engine and all
            else:
                os.kill(proc.pid, signal.SIGTERM)  # a preemption notice to the job
            t = threading.Thread(target=restart_when_gone, args=(sig, host, proc), daemon=True)
            t.host = host
            t.start()
            restarts.append(t)
            time.sleep(rng.uniform(2.0, 4.0))
        for t in restarts:
            t.join(timeout=180)
        codes = [p.wait(timeout=600) for p in procs.values()]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    texts = [open(p, errors="replace").read() for p in logs]
    assert codes == [0, 0, 0], "\n".join(t[-2000:] for t in texts)
    # SIGTERM: exit 1 after the grace period, or -15 when it came before the job loop (during the
    # engine start: nothing held, nothing to save).
    assert sorted(sig for sig, _ in exits) == sorted(events), exits
    assert all(rc == -9 for sig, rc in exits if sig == "SIGKILL"), exits
    graceful = sum("kdgen: error: stopped by a signal" in t for t in texts)
    assert all(rc in (1, -15) for sig, rc in exits if sig == "SIGTERM") and graceful == sum(
        rc == 1 for _, rc in exits) >= 1, exits
    audited = subprocess.run([PYTHON, "-m", "kdgen.cli", "audit", out], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "STORAGE_EMULATOR_HOST": gcs_server.endpoint})
    assert audited.returncode == 0 and audited.stdout.startswith("audit OK: 300/300 rows complete"), audited.stdout
    assert {n.rsplit(".", 1)[1] for n in storage.list_names(out) if naming.parse_object_name(n)} == {"parquet"}
    taken_up = sum(int(n) for t in texts for n in re.findall(r"reusing (\d+) finished rows", t))
    counted = sum(int(n) for t in texts for n in re.findall(r"(?m)^done: .*\((\d+) reused from partial progress\)", t))
    assert taken_up > 0, (taken_up, counted)  # rows finished before a kill or a SIGTERM were not generated again
    assert counted <= taken_up
    # Segments are deleted after their chunk is stored; a kill -9 between the two leaves them behind,
    # for a chunk that is done (never read again).
    left = [ch.name for ch in dataset.plan(data, 30, 0).chunks if storage.list_names(partial.chunk_dir(out, ch.name))]
    assert set(left) <= done_names(out)

"""Fleet-fault bookkeeping without an engine: partial segments, death history and quarantine,
attempt counting in claims, and the compile-cache check (kdgen.fleet.partial, claims, compile_cache)."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from kdgen import storage
from kdgen.engines import compile_cache
from kdgen.fleet import partial
from kdgen.fleet.leases import ClaimStore
from kdgen.corpus.dataset import Chunk
from kdgen.prompts import Prompt

pytestmark = pytest.mark.timeout(120)

CHUNK = Chunk("/data/shard.parquet", "shard", 10, 16)
FP = "f" * 16


def prompts(shift: int = 0) -> list[Prompt]:
    return [Prompt(row_idx=r, token_ids=[r + shift, 7], max_tokens=5) for r in range(CHUNK.start, CHUNK.end)]


def segment(out: str, rows: list[int], take: str = "t1", seq: int = 0, events=(), fingerprint: str = FP,
            chunk: str = CHUNK.name, ps=None, extra_lines: int = 0) -> str:
    ps = {p.row_idx: p for p in (ps or prompts())}
    seg = partial.Segments(out, fingerprint, chunk, "host:0")
    seg.take, seg.seq, seg.pending_events = take, seq, list(events)
    url, head = seg.next(attempt=1)
    items = [partial.Row(r, partial.prompt_hash(ps[r]), [{"row_idx": r, "generated": f"{take}-{r}"}], None, 1, 3, 2)
             for r in rows]
    assert partial.write_segment(url, head, items, chunk)
    if extra_lines:  # a segment whose header does not match its body
        storage.write_bytes(url, storage.read_bytes(url) + b'{"row_idx": 99}\n' * extra_lines)
    return url


def test_load_merges_segments_once_and_only_matching_rows(tmp_path):
    out = str(tmp_path)
    segment(out, [10, 11], take="a")
    segment(out, [11, 12], take="b")  # row 11 twice: taken once
    segment(out, [13], take="c", fingerprint="0" * 16)  # another job's settings
    segment(out, [14], take="d", extra_lines=1)  # torn: its row count disagrees with its header
    segment(out, [15], take="e", ps=prompts(shift=100))  # made from another prompt for row 15
    storage.write_bytes(storage.join(partial.chunk_dir(out, CHUNK.name), FP + "-zz-00000.jsonl"), b"{not json")
    cached = partial.load(out, FP, CHUNK, prompts())
    assert sorted(cached.rows) == [10, 11, 12]
    assert cached.rows[11].records == [{"row_idx": 11, "generated": "a-11"}]  # the first by name
    assert cached.segments == 3
    partial.cleanup(out, CHUNK.name)
    assert not os.path.exists(partial.chunk_dir(out, CHUNK.name))
    assert partial.load(out, FP, CHUNK, prompts()).rows == {}


def test_history_counts_deaths_and_quarantines_only_rows_alone():
    h = partial.History()
    h.add({"died": [10, 11, 12, 13], "alone": False, "intent": None, "reason": "EngineDeadError"})
    assert h.deaths() == {10: 1, 11: 1, 12: 1, 13: 1} and h.quarantine() == {}
    h.add({"intent": "t-1", "rows": [12, 13]})  # a group of two ran alone and the process vanished
    assert h.deaths()[12] == 2 and h.quarantine() == {}
    h.add({"intent": "t-2", "rows": [13]})
    h.add({"cancel": "t-2"})  # SIGTERM cut it short: not a failure
    assert h.deaths()[13] == 2 and h.quarantine() == {}
    h.add({"intent": "t-3", "rows": [13], "proof": 2})
    h.add({"died": [13], "alone": True, "intent": "t-3", "reason": "vLLM engine died: EngineDeadError", "proof": 2})
    q = h.quarantine()
    assert list(q) == [13] and q[13].startswith("the engine died on this row 3 times")
    assert partial.PROOF_MARK in q[13] and q[13].endswith("vLLM engine died: EngineDeadError")
    # A process that vanished while a row ran alone counts, but only twice makes it the row's fault.
    h2 = partial.History([{"intent": "x-1", "rows": [10], "proof": 1}])
    assert h2.quarantine() == {}
    h2.add({"intent": "x-2", "rows": [10], "proof": 1})
    assert list(h2.quarantine()) == [10]


def test_a_row_that_dies_alone_before_any_row_finished_is_not_quarantined():
    """Issue 19 item 1: with no finished row of its chunk (LOGPROBS beyond the vocabulary kills
    every request), dying alone proves nothing: no quarantine; the row runs again after the others."""
    h = partial.History()
    for n in range(3):
        h.add({"intent": f"t-{n}", "rows": [7], "proof": 0})
        h.add({"died": [7], "alone": True, "intent": f"t-{n}", "reason": "selected index k out of range", "proof": 0})
    h.add({"intent": "v-1", "rows": [8]})  # older kdgen wrote no proof: a vanished process twice is no proof either
    h.add({"intent": "v-2", "rows": [8]})
    assert h.quarantine() == {} and h.unproven() == {7}
    assert partial.groups([5, 6, 7], {5: 1, 6: 1, 7: 3}, last=h.unproven()) == [[5], [6], [7]]
    assert partial.groups([7, 5], {5: 2, 7: 3}, last={7})[-1] == [7]


def test_isolation_groups_shrink_to_single_rows():
    rows = list(range(16))
    g1 = partial.groups(rows, {r: 1 for r in rows})
    assert [len(g) for g in g1] == [4, 4, 4, 4]
    deaths = {r: 1 for r in rows} | {r: 2 for r in g1[2]}  # the third group died
    g2 = partial.groups([r for r in rows if r not in g1[0]], deaths)
    assert g2[:4] == [[r] for r in g1[2]]  # the most suspect first, alone
    assert sorted(r for g in g2[4:] for r in g) == sorted(g1[1] + g1[3])


def test_attempts_count_failures_not_graceful_stops(tmp_path):
    out = str(tmp_path)
    a = ClaimStore(out, "a:0", ttl_s=30)
    b = ClaimStore(out, "b:0", ttl_s=30)
    lease = a.try_take("c1")
    assert lease.attempt == 1
    a.release(lease, failed_attempts=lease.attempt - 1)  # SIGTERM: handed back, not a failure
    body = json.loads(storage.read_bytes(a.url("c1")))
    assert body["released"] is True and body["attempt"] == 0
    lease = b.try_take("c1")  # free at once for another host
    assert lease is not None and lease.attempt == 1
    lease.attempt += 1  # the engine died on it: the next attempt is recorded by the renewal
    assert b.renew(lease)
    assert json.loads(storage.read_bytes(b.url("c1")))["attempt"] == 2
    now = [0.0]
    late = ClaimStore(out, "a:0", ttl_s=30, mono=lambda: now[0])  # b vanished; its lease expires
    assert late.try_take("c1") is None  # live as far as `late` has seen (expiry by observation)
    now[0] += 31  # unchanged for the ttl on late's clock
    took = late.try_take("c1")
    assert took is not None and took.attempt == 3
    late.release(took)  # committed: the claim goes
    assert not storage.exists(a.url("c1"))
    assert a.try_take("c1").attempt == 1


class CacheLoadingLLM:
    """Stands in for vLLM's LLM at start-up: loads every compiled artifact of the compile cache as
    vLLM's workers do (shared objects with the real loader, in a child process; generated Python
    compiled) and fails the start if one cannot load, or for a reason of its own."""

    starts = 0
    fail_anyway = False

    def __init__(self, **kwargs):
        type(self).starts += 1
        if self.fail_anyway:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        cdir = compile_cache.compile_dir(os.environ["VLLM_CACHE_ROOT"])
        for dirpath, _, files in os.walk(cdir):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith(".so"):
                    r = subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", path],
                                       capture_output=True, text=True, timeout=60)
                    if r.returncode:
                        raise ImportError(f"worker died loading a compiled artifact ({r.stderr.strip()[-80:]})")
                elif name.endswith(".py"):
                    with open(path, "rb") as f:
                        compile(f.read(), path, "exec")


@pytest.fixture()
def llm(tmp_path, monkeypatch):
    root = tmp_path / "vllm"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(root))
    monkeypatch.setattr(CacheLoadingLLM, "starts", 0)
    monkeypatch.setattr(CacheLoadingLLM, "fail_anyway", False)
    return str(root)


def test_a_start_that_fails_on_a_truncated_shared_object_starts_again_without_the_cache(llm, caplog):
    import _json

    from kdgen.engines.vllm_engine import VllmEngine

    cache = os.path.join(compile_cache.compile_dir(llm), "torch_aot_compile", "h", "inductor_cache", "ab")
    os.makedirs(cache)
    good = os.path.join(cache, "cgood.main.so")
    shutil.copy(_json.__file__, good)  # a real shared object
    ctypes.CDLL(good)
    assert isinstance(VllmEngine._start(CacheLoadingLLM, {}, "m"), CacheLoadingLLM) and CacheLoadingLLM.starts == 1
    assert not caplog.records and os.path.exists(good)  # a sound cache is kept
    data = open(good, "rb").read()
    bad = os.path.join(cache, "cbad.main.so")
    for size in (40, 1000, len(data) // 2, len(data) - 100):  # cut in the header, its tables, the body
        os.makedirs(cache, exist_ok=True)
        with open(bad, "wb") as f:
            f.write(data[:size])
        if size <= 1000:  # what an engine worker runs into: "file too short", or a bus error
            r = subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", bad],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0
        CacheLoadingLLM.starts = 0
        caplog.clear()
        with caplog.at_level("WARNING", logger="kdgen.engines.vllm_engine"):
            assert isinstance(VllmEngine._start(CacheLoadingLLM, {}, "m"), CacheLoadingLLM)
        if size > 1000 and CacheLoadingLLM.starts == 1:  # the loader took this cut: nothing to do
            continue
        assert CacheLoadingLLM.starts == 2 and not os.path.exists(compile_cache.compile_dir(llm))
        lines = [x.getMessage() for x in caplog.records]
        assert len(lines) == 1 and "\n" not in lines[0] and compile_cache.compile_dir(llm) in lines[0], lines
        moved = lines[0].split(" aside to ")[1].split()[0]
        assert os.path.exists(os.path.join(moved, "torch_aot_compile", "h", "inductor_cache", "ab", "cbad.main.so"))
    assert len(glob.glob(compile_cache.compile_dir(llm) + ".corrupt-*")) >= 2


def test_broken_generated_python_starts_again_without_the_cache_and_other_failures_say_why(llm):
    from kdgen.engines.base import EngineError
    from kdgen.engines.vllm_engine import VllmEngine

    cache = os.path.join(compile_cache.compile_dir(llm), "h", "inductor_cache", "cd")
    os.makedirs(cache)
    code = os.path.join(cache, "ckernel.py")
    with open(code, "w") as f:
        f.write("def call(args):\n    return [a + 1 for a in ar")  # cut short
    VllmEngine._start(CacheLoadingLLM, {}, "m")
    assert CacheLoadingLLM.starts == 2 and not os.path.exists(compile_cache.compile_dir(llm))
    assert compile_cache.move_aside(llm) is None  # nothing left to move
    # A start that fails for another reason: with no cache at once, with one after one more try.
    CacheLoadingLLM.fail_anyway, CacheLoadingLLM.starts = True, 0
    with pytest.raises(EngineError, match=r"^vLLM could not start for MODEL_PATH 'm': Engine core"):
        VllmEngine._start(CacheLoadingLLM, {}, "m")
    assert CacheLoadingLLM.starts == 1
    os.makedirs(cache)
    with open(code, "w") as f:
        f.write("x = 1\n")
    with pytest.raises(EngineError, match="also with a fresh compile cache"):
        VllmEngine._start(CacheLoadingLLM, {}, "m")
    assert CacheLoadingLLM.starts == 3


def test_each_chunk_checkpoints_on_its_own_schedule(tmp_path):
    """CHECKPOINT_EVERY_S counts from each chunk's take-up (or last save): a chunk taken up a moment
    ago writes no segment yet, one in flight for longer does, and then waits its period again."""
    import time

    from kdgen.worker.custody import Custodian
    from kdgen.worker.handoff import Handoff
    from kdgen.worker.saves import PartialSaves
    from kdgen.worker.schedule import Schedule
    from kdgen.worker.summary import Summary
    from kdgen.worker.work import ChunkWork
    from kdgen.engines.base import Finished, Sample
    from tests.conftest import job_config

    out = str(tmp_path / "out")
    c = job_config(model_path="m", dataset_path="d", output_path=out, checkpoint_every_s=5.0)
    saver = partial.Saver()
    custodian = Custodian(out, claims=None, heartbeat=None, saver=saver)
    sched = Schedule(c, Handoff(), custodian, Summary(), PartialSaves(c, saver), None, "me:0", isolate=True)
    now = time.monotonic()
    works = {}
    for name, age in (("old", 10.0), ("new", 1.0)):
        chunk = Chunk("f.parquet", name, 0, 2)
        w = ChunkWork(chunk, custodian.take(name, None),
                      [Prompt(row_idx=0, token_ids=[1, 2]), Prompt(row_idx=1, token_ids=[3])])
        w.custody.start_feeding()
        w.started, w.saved_at = True, now - age
        w.segments = partial.Segments(out, sched.fingerprint, chunk.name, "me:0")
        w.results[0] = Finished("r", [Sample(0, [7], "x", "length")])
        w.unsaved = [0]
        sched.in_flight[chunk.name] = works[name] = w
    sched.checkpoint(5.0)
    for w in works.values():
        w.wait_saves()
    assert storage.list_names(partial.chunk_dir(out, works["old"].chunk.name))
    assert not storage.list_names(partial.chunk_dir(out, works["new"].chunk.name))
    assert works["new"].unsaved == [0] and works["old"].unsaved == []
    works["old"].results[1] = Finished("r2", [Sample(0, [8], "y", "length")])
    works["old"].unsaved = [1]
    sched.checkpoint(5.0)  # just saved: its period starts again
    assert works["old"].unsaved == [1]
    saver.close()

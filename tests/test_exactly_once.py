"""Exactly-once holes of issue 9, one test per item, each reproducing the failure of the code
before the fix (no engine: feeder, claims, storage, job file and audit on their own)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus import jobfile
from kdgen.worker import runner
from kdgen.worker.custody import Custodian
from kdgen.worker.feeder import Feeder
from kdgen.worker.handoff import Handoff
from kdgen.views import audit
from kdgen.records import chunk_object
from kdgen.prompts import PromptBuilder
from tests.conftest import job_config

pytestmark = pytest.mark.timeout(300)


def feeder_for(c, tokenizer, order=(), claims=None, heartbeat=None):
    builder = PromptBuilder(c, tokenizer, 512)
    custodian = Custodian(c.output_path, claims, heartbeat, saver=None)
    return Feeder(c, list(order), builder, claims, custodian, Handoff(), threading.Event())


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def texts(n: int, tag: str = "row") -> pa.Table:
    return pa.table({"text": [f"{tag} {i} about the river and the mountain" for i in range(n)]})


# ---------------------------------------------------------------- item 1: only data makes error rows

def test_storage_outage_stops_instead_of_failing_rows(gcs_server, tokenizer, tiny_model, monkeypatch):
    """Reads of one input file answer 503 for longer than the retries: the feeder raises a
    StorageError (the job stops, the rows stay to be done) within the storage deadline; it used
    to turn every row of the chunk into an error record that resume skips forever."""
    from tests.proxy import FaultProxy

    base = gcs_server.url(f"outage-{uuid.uuid4().hex[:8]}")
    data = storage.join(base, "corpus")
    storage.write_bytes(storage.join(data, "a.parquet"), parquet_bytes(texts(20), 10))
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=storage.join(base, "out"), chunk_size=10)
    plan = dataset.plan(data, 10)
    key = data.split("/", 3)[3] + "/a.parquet"
    monkeypatch.setattr(storage.settings, "base_delay_s", 0.2)
    storage.configure(deadline_s=4)
    try:
        with FaultProxy(gcs_server.endpoint, mode="fail_key", fail_key=key) as proxy:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
            t0 = time.monotonic()
            with pytest.raises(storage.StorageError, match=r"a\.parquet"):
                feeder_for(c, tokenizer).prompts_for(plan.chunks[0])
            assert time.monotonic() - t0 < 20 and proxy.failed > 0
            proxy.failing = False  # the outage ends: the same chunk reads fine
            prompts = feeder_for(c, tokenizer).prompts_for(plan.chunks[0])
            assert len(prompts) == 10 and all(p.error is None for p in prompts)
    finally:
        storage.configure(deadline_s=300)


def test_memory_error_while_reading_stops(tmp_path, tokenizer, tiny_model, monkeypatch):
    pq.write_table(texts(10), str(tmp_path / "a.parquet"))
    c = job_config(model_path=tiny_model, dataset_path=str(tmp_path), output_path=str(tmp_path / "out"))
    chunk = dataset.plan(str(tmp_path), 10).chunks[0]

    def no_memory(*a, **k):
        raise MemoryError("out of memory")

    monkeypatch.setattr(pq.ParquetFile, "__init__", no_memory)
    with pytest.raises(MemoryError):
        feeder_for(c, tokenizer).prompts_for(chunk)


def test_only_the_rows_of_an_undecodable_row_group_are_error_records(tmp_path, tokenizer, tiny_model):
    path = str(tmp_path / "a.parquet")
    pq.write_table(texts(30), path, row_group_size=10)
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    with open(path, "r+b") as f:  # garble the pages of row group 1 (rows 10-19) in place, same size
        f.seek(col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset)
        f.write(b"\xff" * col.total_compressed_size)
    c = job_config(model_path=tiny_model, dataset_path=str(tmp_path), output_path=str(tmp_path / "out"),
                   chunk_size=30)
    chunk = dataset.plan(str(tmp_path), 30).chunks[0]
    prompts = feeder_for(c, tokenizer).prompts_for(chunk)
    assert [p.row_idx for p in prompts] == list(range(30))
    bad = [p for p in prompts if p.error]
    assert [p.row_idx for p in bad] == list(range(10, 20))
    assert all(p.error_kind == "data" and "row group 1" in p.error for p in bad)


def write_chunk(out: str, chunk: dataset.Chunk, rows: list[int], errors: list[dict]) -> None:
    records = [{"parquet_file": chunk.file, "row_idx": r, "prefix": "", "generated": "", "sample_idx": 0}
               for r in rows]
    chunk_object.commit_chunk(job_config(model_path="m", dataset_path="d", output_path=out), chunk, records, errors)


def test_audit_fails_on_error_records_that_are_not_data(tmp_path):
    data, out = str(tmp_path / "c"), str(tmp_path / "out")
    os.makedirs(data)
    pq.write_table(texts(4), os.path.join(data, "a.parquet"))
    pq.write_table(texts(4), os.path.join(data, "b.parquet"))
    c = job_config(model_path="m", dataset_path=data, output_path=out, chunk_size=4)
    p = runner.prepare(c, {"text": "string"})
    a, b = sorted(p.chunks, key=lambda ch: ch.name)
    # a: one row is null (a data error); b: every row "failed" because a read failed (older
    # kdgen wrote such records without a kind) and, to be sure, one with an explicit kind.
    write_chunk(out, a, [0, 1, 2], [{"parquet_file": a.file, "row_idx": 3, "error": "text is null",
                                     "error_kind": "data"}])
    write_chunk(out, b, [], [{"parquet_file": b.file, "row_idx": r,
                              "error": f"could not read rows 0-4 of {b.file}: StorageError: read: 503"}
                             for r in range(3)] + [{"parquet_file": b.file, "row_idx": 3, "error": "403 Forbidden",
                                                    "error_kind": "credential"}])
    r = audit.audit(out)
    assert not r["ok"] and r["rows_failed"] == 1 and r["rows_failed_not_data"] == 4
    assert {(e["row_idx"], e["error_kind"]) for e in r["not_data_errors"]} == {(0, "read"), (1, "read"), (2, "read"),
                                                                               (3, "credential")}
    text = audit.format_audit(r)
    assert text.startswith("audit FAILED") and "not a data error (credential)" in text and b.name in text


# ---------------------------------------------------------------- item 4: the corpus is pinned

def prepare(data: str, out: str, **kw):
    c = job_config(model_path="m", dataset_path=data, output_path=out, chunk_size=5, **kw)
    return runner.prepare(c, {"text": "string"})


def test_new_subfolder_renames_nothing_and_needs_extend(tmp_path):
    from kdgen.corpus.jobfile import CorpusMismatch

    data, out = tmp_path / "corpus", str(tmp_path / "out")
    (data / "part").mkdir(parents=True)
    pq.write_table(texts(10), str(data / "part" / "a.parquet"))
    first = prepare(str(data), out)
    assert sorted({ch.stem for ch in first.chunks}) == ["part__a"]
    (data / "extra").mkdir()
    pq.write_table(texts(7), str(data / "extra" / "z.parquet"))
    with pytest.raises(CorpusMismatch, match=r"extra/z\.parquet is not one of the 1 input files pinned.*--extend") as e:
        prepare(str(data), out)
    assert "\n" not in str(e.value)
    extended = prepare(str(data), out, extend=True)
    assert {ch.name for ch in first.chunks} < {ch.name for ch in extended.chunks}
    assert sorted({ch.stem for ch in extended.chunks}) == ["extra__z", "part__a"] and extended.num_rows == 17
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["version"] == 2 and job["rows"] == 17 and len(job["corpus"]["files"]) == 2
    [ext] = job["corpus"]["extensions"]
    assert ext["files"] == [str(data / "extra" / "z.parquet")] and ext["rows"] == 7
    assert prepare(str(data), out).chunks == extended.chunks  # pinned now: no --extend needed


def test_changed_files_are_refused_by_name(tmp_path):
    from kdgen.corpus.jobfile import CorpusMismatch

    data, out = tmp_path / "c", str(tmp_path / "out")
    data.mkdir()
    pq.write_table(texts(10), str(data / "a.parquet"))
    pq.write_table(texts(10), str(data / "b.parquet"))
    p = prepare(str(data), out)
    os.utime(data / "a.parquet")  # touched (or copied): same bytes, so same size and footer: accepted
    assert prepare(str(data), out).chunks == p.chunks
    pq.write_table(texts(10, "new"), str(data / "b.parquet"))  # rewritten in place, other content
    with pytest.raises(CorpusMismatch, match=r"b\.parquet changed since the job pinned it"):
        prepare(str(data), out)
    pq.write_table(texts(6), str(data / "b.parquet"))  # rewritten shorter
    with pytest.raises(CorpusMismatch, match=r"b\.parquet changed since the job pinned it \(size"):
        prepare(str(data), out)
    os.remove(data / "b.parquet")
    with pytest.raises(CorpusMismatch, match=r"b\.parquet is pinned in the job file but no longer found"):
        prepare(str(data), out)


def test_a_file_that_shrinks_after_planning_never_makes_a_short_chunk(tmp_path, tokenizer, tiny_model):
    data = tmp_path / "c"
    data.mkdir()
    pq.write_table(texts(10), str(data / "a.parquet"))
    p = dataset.plan(str(data), 10)
    pq.write_table(texts(5), str(data / "a.parquet"))  # rewritten shorter while the job runs
    with pytest.raises(storage.InputChanged, match=r"a\.parquet changed while the job ran"):
        dataset.read_chunk_rows(p.chunks[0], ["text"])
    unpinned = dataset.Chunk(str(data / "a.parquet"), "a", 0, 10)  # no version known: the row count still counts
    with pytest.raises(storage.InputChanged, match=r"rows 0-10 planned, only 5 there"):
        dataset.read_chunk_rows(unpinned, ["text"])
    c = job_config(model_path=tiny_model, dataset_path=str(data), output_path=str(tmp_path / "out"), chunk_size=10)
    with pytest.raises(storage.InputChanged):
        feeder_for(c, tokenizer).prompts_for(p.chunks[0])


def test_job_files_without_a_pin_keep_resuming(tmp_path):
    """A job started by kdgen before the pin: files under part/ only, stems relative to their
    common folder ('a', not 'part__a'), _job.json without corpus and without the fingerprint keys
    added since. It resumes under its old names; chunk names that match no file are refused."""
    from kdgen.corpus.jobfile import CorpusMismatch

    data, out = tmp_path / "corpus", str(tmp_path / "out")
    (data / "part").mkdir(parents=True)
    pq.write_table(texts(10), str(data / "part" / "a.parquet"))
    c = job_config(model_path="m", dataset_path=str(data), output_path=out, chunk_size=5)
    fp = {k: v for k, v in c.fingerprint().items() if k not in ("dtype", "max_model_len", "endpoint_api")}
    os.makedirs(out)
    with open(os.path.join(out, "_job.json"), "w") as f:
        json.dump({"fingerprint": fp, "plan": "old", "chunks": 2, "rows": 10, "created_at": 1.0}, f)
    with open(os.path.join(out, "a_rows_0000000_0000005.jsonl"), "w") as f:
        f.write("")
    p = prepare(str(data), out)
    assert sorted(ch.name for ch in p.chunks) == ["a_rows_0000000_0000005", "a_rows_0000005_0000010"]
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["version"] == 2 and job["corpus"]["files"][0]["stem"] == "a"
    assert prepare(str(data), out).chunks == p.chunks  # and now it is pinned
    out2 = str(tmp_path / "out2")
    os.makedirs(out2)
    with open(os.path.join(out2, "_job.json"), "w") as f:
        json.dump({"fingerprint": fp, "chunks": 2, "rows": 10}, f)
    with open(os.path.join(out2, "gone_rows_0000000_0000005.jsonl"), "w") as f:
        f.write("")
    with pytest.raises(CorpusMismatch, match="output name 'gone'"):
        prepare(str(data), out2)


# ---------------------------------------------------------------- item 2: one malformed chat row

STRICT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ('system', 'user', 'assistant') %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_a_chat_row_the_template_refuses_is_one_error_record(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = STRICT_TEMPLATE
    conv = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}],  # roles do not alternate
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Go"}],
        [{"role": "wizard", "content": "Hi"}],  # unknown role
    ]
    pq.write_table(pa.table({"messages": conv}), str(tmp_path / "chat.parquet"))
    c = job_config(model_path=tiny_model, dataset_path=str(tmp_path), output_path=str(tmp_path / "out"),
                   prompt_mode="chat", messages_column="messages", max_target_length=200)
    chunk = dataset.plan(str(tmp_path), 20).chunks[0]
    feeder = feeder_for(c, tok)
    prompts = feeder.prompts_for(chunk)
    assert [p.row_idx for p in prompts] == [0, 1, 2, 3]
    assert [p.error is None for p in prompts] == [True, False, True, False]
    assert "roles must alternate" in prompts[1].error and "unknown role wizard" in prompts[3].error
    assert prompts[1].error_kind == "data" and prompts[0].token_ids and prompts[2].token_ids


# ---------------------------------------------------------------- item 5: check, then take, then check

def test_a_chunk_committed_between_check_and_take_is_not_generated_again(tmp_path, tokenizer, tiny_model):
    from kdgen.fleet.heartbeat import Heartbeat
    from kdgen.fleet.leases import ClaimStore

    data, out = tmp_path / "c", str(tmp_path / "out")
    data.mkdir()
    pq.write_table(texts(10), str(data / "a.parquet"))
    c = job_config(model_path=tiny_model, dataset_path=str(data), output_path=out, chunk_size=10)
    chunk = runner.prepare(c, {"text": "string"}).chunks[0]
    claims = ClaimStore(out, "me", ttl_s=30)
    real_take = claims.try_take

    def take_after_the_other_host_finished(name):
        # Another host held the lease, committed the chunk and released the lease: all of it
        # between our exists() check and our take.
        chunk_object.commit_chunk(c, chunk, [{"row_idx": r} for r in range(10)], [])
        return real_take(name)

    claims.try_take = take_after_the_other_host_finished
    hb = Heartbeat(claims)
    try:
        feeder = feeder_for(c, tokenizer, [chunk], claims, hb)
        feeder.run()
    finally:
        hb.stop()
    assert feeder.error is None
    assert feeder.handoff.get_nowait() is None and feeder.handoff.empty()  # nothing queued to generate again
    assert hb.held() == [] and claims.list_leases() == []  # and the lease was handed back


# ---------------------------------------------------------------- item 7: owner identity

HOLDER = r"""
import sys, time
from kdgen.fleet.leases import ClaimStore
store = ClaimStore(sys.argv[1], sys.argv[2], ttl_s=600, identity_source="machine-id")
assert store.try_take("c0") is not None
print("held", flush=True)
time.sleep(120)
"""


def test_owner_id_survives_a_new_hostname(monkeypatch, tmp_path):
    import socket

    from kdgen.fleet import leases

    mid = tmp_path / "machine-id"
    mid.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    monkeypatch.setattr(leases, "MACHINE_ID_PATHS", (str(mid),))
    c = job_config(model_path="m", dataset_path="d", output_path="o", host_index=2, num_hosts=4)
    monkeypatch.setattr(socket, "gethostname", lambda: "a1b2c3d4e5f6")  # docker run without --hostname
    first = runner.owner_id(c)
    monkeypatch.setattr(socket, "gethostname", lambda: "0f9e8d7c6b5a")  # the same container, restarted
    assert runner.owner_id(c) == first == "3d1219c7c4c5404a:2"
    assert runner.owner_id(job_config(model_path="m", dataset_path="d", output_path="o", host_id="tpu-w3")) == "tpu-w3:0"
    monkeypatch.setattr(leases, "MACHINE_ID_PATHS", (str(tmp_path / "none"),))
    assert runner.owner_id(c) == "0f9e8d7c6b5a:2"  # no machine id: the hostname, as a last resort


def test_same_owner_takes_back_a_live_lease_only_when_its_process_is_gone(tmp_path):
    """Two hosts with the same owner id (equal hostnames, default index): the second must not take
    over the first's live lease; once the first process is gone it takes it back at once."""
    import subprocess
    import sys

    from kdgen.fleet.leases import ClaimStore
    from tests.conftest import REPO

    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out, "twin:0"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "held"
        twin = ClaimStore(out, "twin:0", ttl_s=600, identity_source="machine-id")
        assert twin.try_take("c0") is None  # same owner id, but its process is alive
    finally:
        holder.kill()
        holder.wait()
    lease = twin.try_take("c0")  # that process is gone: taken back without waiting for expiry
    assert lease is not None and json.loads(storage.read_bytes(twin.url("c0")))["pid"] == os.getpid()


# ---------------------------------------------------------------- item 8: clock skew

def test_a_host_ten_minutes_ahead_cannot_steal_live_leases(tmp_path, caplog):
    from kdgen.fleet.heartbeat import Heartbeat
    from kdgen.fleet.leases import ClaimStore

    out = str(tmp_path / "out")
    a = ClaimStore(out, "A", ttl_s=1.5)
    ahead = ClaimStore(out, "B", ttl_s=1.5, clock=lambda: time.time() + 600)
    lease = a.try_take("c0")
    hb = Heartbeat(a)  # renews every 0.5 s
    hb.add(lease)
    try:
        t_end = time.monotonic() + 3.5  # more than twice the ttl
        while time.monotonic() < t_end:
            assert ahead.try_take("c0") is None  # A's expires_at is long past on B's clock: still A's
            time.sleep(0.1)
    finally:
        hb.stop()
    stopped = time.monotonic()  # A renews no more: B takes over once it saw no change for the ttl
    while (taken := ahead.try_take("c0")) is None:
        assert time.monotonic() - stopped < 10
        time.sleep(0.05)
    assert time.monotonic() - stopped >= 1.5 - 0.5  # (A's last renewal was at most 0.5 s before the stop)
    assert taken.owner == "B"
    caplog.clear()
    c = ClaimStore(out, "C", ttl_s=1.5)
    assert c.try_take("c0") is None  # B's live lease; B's clock is 600 s ahead of C's: a warning says so
    assert "the clock of B" in caplog.text and "+600 s" in caplog.text


# ---------------------------------------------------------------- item 10: fingerprint gaps

@pytest.mark.parametrize("change", [dict(dtype="bfloat16"), dict(max_model_len=256),
                                    dict(endpoint="http://127.0.0.1:9/v1", endpoint_api="chat")])
def test_engine_settings_that_change_output_are_pinned(tmp_path, change):
    from kdgen.corpus.jobfile import FingerprintMismatch

    data, out = tmp_path / "c", str(tmp_path / "out")
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["a row"]}), str(data / "a.parquet"))
    base = dict(model_path="m", dataset_path=str(data), output_path=out, dtype="float32", max_model_len=512,
                prompt_mode="chat")
    runner.prepare(job_config(**base), {"prompt": "string"})
    jobfile.mark_started(out, job_config(**base).fingerprint(), "host-a", 30.0)  # else a re-pin is allowed
    key = "endpoint_api" if "endpoint_api" in change else next(iter(change))
    with pytest.raises(FingerprintMismatch, match=rf"\({key}: "):
        runner.prepare(job_config(**{**base, **change}), {"prompt": "string"})
    runner.prepare(job_config(**{**base, "endpoint": "http://127.0.0.1:9/v1"}), {"prompt": "string"})  # completions: same prompts


def test_a_multi_host_output_on_fuse_is_warned_about(tmp_path, monkeypatch, caplog):
    data = tmp_path / "c"
    data.mkdir()
    pq.write_table(texts(2), str(data / "a.parquet"))
    monkeypatch.setattr(storage, "local_fs_type", lambda url: "fuse.gcsfuse")
    c = job_config(model_path="m", dataset_path=str(data), output_path=str(tmp_path / "out"), num_hosts=2)
    runner.prepare(c, {"text": "string"})
    assert "is on a FUSE file system (fuse.gcsfuse)" in caplog.text and "gs://" in caplog.text

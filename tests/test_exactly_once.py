"""Exactly-once holes of issue 9, one test per item, each reproducing the failure of the code
before the fix (no engine: feeder, claims, storage, job file and audit on their own)."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import dataset, runner, status, storage, writer
from kdgen.prompts import PromptBuilder
from tests.conftest import job_config

pytestmark = pytest.mark.timeout(300)


def feeder_for(c, tokenizer, order=(), claims=None, heartbeat=None):
    builder = PromptBuilder(c, tokenizer, 512)
    return runner.Feeder(c, list(order), builder, claims, heartbeat, queue.Queue(), threading.Event())


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
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.2)
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
    writer.commit_chunk(out, chunk, records, errors)


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
    r = status.audit(out)
    assert not r["ok"] and r["rows_failed"] == 1 and r["rows_failed_not_data"] == 4
    assert {(e["row_idx"], e["error_kind"]) for e in r["not_data_errors"]} == {(0, "read"), (1, "read"), (2, "read"),
                                                                               (3, "credential")}
    text = status.format_audit(r)
    assert text.startswith("audit FAILED") and "not a data error (credential)" in text and b.name in text

"""`kdgen show` on real outputs (local and gs://), and `kdgen status --watch`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage, tiny
from kdgen.worker import runner
from kdgen.views import show
from kdgen.views import status
from kdgen.records import chunk_object
from tests.conftest import PYTHON, job_config


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "kdgen.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Two clean files and one with a null and an empty row (error rows)."""
    d = tmp_path_factory.mktemp("show-corpus")
    tiny.make_corpus(str(d), num_files=2, rows_per_file=12, seed=21)
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": ["A river.", None, "", "The dog runs."]}),
                   str(d / "z-bad.parquet"))
    return str(d)


@pytest.fixture(scope="module")
def out(engine, tiny_model, corpus, tmp_path_factory) -> str:
    o = str(tmp_path_factory.mktemp("show-out") / "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=corpus, output_path=o, chunk_size=10, logprobs=2),
               engine=engine)
    return o


def shown(out: str, **kw) -> str:
    buf = io.StringIO()
    show.show(out, stream=buf, **kw)
    return buf.getvalue()


def test_show_prints_records_with_prompt_completion_tokens_and_logprobs(out):
    text = shown(out, n=3)
    first = json.loads(open(os.path.join(out, "shard-00000_rows_0000000_0000010.jsonl")).readline())
    assert text.count("── shard-00000.parquet row ") == 3
    assert f"prompt ({len(first['prompt_token_ids'])} tokens):" in text
    assert f"completion ({len(first['completion_token_ids'])} tokens; finish_reason {first['finish_reason']}):" in text
    assert first["prefix"].split()[0] in text and "logprobs: top-2 at " in text and "perplexity" in text
    assert text.startswith(os.path.join(out, "shard-00000_rows_0000000_0000010.jsonl") + ": 10 records, 0 error rows")


def test_show_a_row_a_chunk_and_error_rows(out):
    text = shown(out, row="shard-00001.parquet:11")
    assert [line.rstrip("─ ") for line in text.splitlines() if line.startswith("── ")] == [
        "── shard-00001.parquet row 11 · sample 0"]
    bad = shown(out, row="z-bad:1")
    assert "── z-bad.parquet row 1 · ERROR" in bad and "text is null" in bad
    chunk = shown(out, chunk="z-bad_rows_0000000_0000004.jsonl", n=5)
    assert chunk.count("── z-bad.parquet row ") == 4  # rows 0 and 3, errors 1 and 2
    assert "2 records, 2 error rows" in chunk and "empty" in chunk
    assert shown(out, chunk="z-bad_rows_0000000_0000004", n=5) == chunk


def test_show_formats_scoring_records_and_cuts_long_texts():
    scored = show.format_record({"parquet_file": "gs://b/s.parquet", "row_idx": 3, "token_ids": [0, 7, 9],
                                 "token_logprobs": [None, -1.0, -2.0], "completion_start": 1,
                                 "completion_end": 3, "completion_logprob": -3.0})
    assert "s.parquet row 3" in scored and "scored 3 tokens; logprobs: sampled tokens mean -1.500" in scored
    assert "completion tokens 1-3: logprob -3.000" in scored
    long = show.format_record({"parquet_file": "f", "row_idx": 0, "prefix": "p", "generated": "x" * 2500,
                               "prompt_token_ids": [1], "completion_token_ids": [2], "finish_reason": "length"})
    assert "… (+500 characters)" in " ".join(long.split()) and long.count("x") == 2000


def test_status_watch_on_a_terminal_redraws_in_place(out):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    assert status.watch(out, every=0.01, count=3, stream=term) == 1  # the job is done: one refresh
    assert term.getvalue().startswith("\x1b[H\x1b[2J== ") and "job done: every chunk is stored" in term.getvalue()


@pytest.mark.parametrize("kw,message", [
    (dict(row="shard-00001.parquet"), "--row must be FILE:ROW"),
    (dict(row="shard-00009.parquet:1"), "no chunk object in"),
    (dict(row="shard-00001.parquet:99"), "row 99 of shard-00001.parquet is in no chunk object"),
    (dict(chunk="shard-00000_rows_0000000_0000999"), "no chunk object 'shard-00000_rows_0000000_0000999'"),
    (dict(n=0), "--n must be >= 1"),
])
def test_show_says_what_is_wrong(out, kw, message):
    with pytest.raises(show.ShowError, match=message.replace("(", r"\(")):
        shown(out, **kw)


def test_show_on_a_directory_without_output(tmp_path):
    r = cli("show", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"kdgen: error: {tmp_path} holds no chunk objects yet (and no _job.json: is it a kdgen output?)"


def test_show_conversations_records(engine, tiny_model, tmp_path):
    data = tmp_path / "chat"
    data.mkdir()
    pq.write_table(pa.table({"instruction": ["Name a river.", None]}), str(data / "magpie.parquet"))
    o = str(tmp_path / "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=str(data), output_path=o, preset="magpie",
                          max_target_length=80), engine=engine)
    text = shown(o, n=5)
    assert "human:\n  Name a river." in text and "completion (" in text and "finish_reason" in text
    assert "── magpie.parquet row 1 · ERROR" in text and "instruction is null" in text


def test_read_chunk_object_splits_records_and_error_rows(tmp_path):
    url = str(tmp_path / "x_rows_0000000_0000003.jsonl")
    storage.write_bytes(url, chunk_object.encode_jsonl([
        {"parquet_file": "f", "row_idx": 0, "generated": "a"},
        {"parquet_file": "f", "row_idx": 1, "error": "text is null"},
        {"id": "f-2", "conversations": [], "metadata": {"parquet_file": "f", "idx": 2, "error": "too long"}}]))
    records, errors = chunk_object.read_chunk_object(url)
    # a conversations line that failed (metadata.error) is an error row too
    assert [r["row_idx"] for r in records] == [0] and errors == [
        {"parquet_file": "f", "row_idx": 1, "error": "text is null"},
        {"parquet_file": "f", "row_idx": 2, "error": "too long"}]


@pytest.mark.usefixtures("gcs_server")
def test_show_on_gs_output(engine, tiny_model, corpus, gcs_server):
    data, o = gcs_server.url("show", "corpus"), gcs_server.url("show", "out")
    for name in sorted(os.listdir(corpus)):
        storage.write_bytes(storage.join(data, name), open(os.path.join(corpus, name), "rb").read())
    runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=o, chunk_size=10, limit=14),
               engine=engine)
    env = {"STORAGE_EMULATOR_HOST": gcs_server.endpoint}
    r = cli("show", o, "--n", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{o}/shard-00000_rows_0000000_0000010.jsonl: 10 records")
    assert r.stdout.count("── shard-00000.parquet row ") == 2 and "completion (" in r.stdout
    r = cli("show", o, "--row", f"{data}/shard-00001.parquet:1", env=env)  # FILE as its URL
    assert r.returncode == 0 and "── shard-00001.parquet row 1 · sample 0" in r.stdout, r.stderr


def test_audit_of_a_parquet_output_on_gs_exits_0_every_time(engine, tiny_model, corpus, gcs_server):
    """pyarrow's thread pools could abort the interpreter's teardown after a passed audit (exit 134
    about every other run of this very command, before the CLI's hard exit): five runs in a row."""
    data, o = gcs_server.url("audit-pq", "corpus"), gcs_server.url("audit-pq", "out")
    for name in sorted(os.listdir(corpus)):
        storage.write_bytes(storage.join(data, name), open(os.path.join(corpus, name), "rb").read())
    runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=o, chunk_size=5,
                          output_file_format="parquet", logprobs=2), engine=engine)
    env = {"STORAGE_EMULATOR_HOST": gcs_server.endpoint}
    for _ in range(5):
        r = cli("audit", o, env=env)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        assert r.stdout.startswith("audit OK: 26/28 rows complete, 2 failed rows"), r.stdout


def headers(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("== ")]


def test_status_watch_refreshes_until_the_job_is_done_or_count(engine, tiny_model, tmp_path):
    data, o = str(tmp_path / "data"), str(tmp_path / "out")
    tiny.make_corpus(data, num_files=2, rows_per_file=20, seed=22)
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=o, chunk_size=10)
    runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=o, chunk_size=10, max_chunks=2),
               engine=engine)
    counted = cli("status", o, "--watch", "--every", "0.2", "--count", "2")
    assert counted.returncode == 0, counted.stderr
    assert len(headers(counted.stdout)) == 2 and "refresh 2/2" in counted.stdout
    assert counted.stdout.count(f"{o}: 2/4 chunks done") == 2

    watcher = subprocess.Popen([PYTHON, "-m", "kdgen.cli", "status", o, "--watch", "--every", "0.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = [watcher.stdout.readline() for _ in range(2)]
        assert first[0].startswith("== ") and f"{o}: 2/4 chunks done" in first[1], first
        runner.run(c, engine=engine)  # the rest of the job, while it watches
        rest, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    assert len(headers(rest)) >= 1 and "job done: every chunk is stored" in headers(rest)[-1]
    assert rest.rstrip().split("== ")[-1].count(f"{o}: 4/4 chunks done, 0 leased, 0 pending") == 1


def test_status_names_the_slowest_working_host(tmp_path):
    now = time.time()
    hosts = [{"owner": f"h{i}:{i}", "chunks": 3, "rows": 300, "rows_per_s": rate, "tokens_per_s": rate * 50,
              "started_at": now - 60, "updated_at": now - 5, "finished": done}
             for i, (rate, done) in enumerate([(12.0, False), (3.5, False), (11.0, False), (0.5, True)])]
    report = {"output_path": "o", "chunks_done": 9, "chunks_total": 20, "chunks_leased": 3, "chunks_pending": 8,
              "chunks_expired_leases": 0, "rows_done": 900, "rows_total": 2000, "generated_tokens": 1,
              "chunks_with_error_rows": 0, "leases": [],
              "hosts": [{**h, "last_seen_s_ago": 5.0} for h in hosts]}
    text = status.format_status(report)
    assert "slowest host: h1:1 at 3.5 rows/s (175 tok/s; median of working hosts 11.0 rows/s)" in text
    one = {**report, "hosts": report["hosts"][:1]}
    assert "slowest host" not in status.format_status(one)

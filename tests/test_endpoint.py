"""The endpoint engine against a real `vllm serve` of the tiny model (session fixture vllm_server)."""

from __future__ import annotations

import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import config as config_mod
from kdgen import runner, status, tiny
from kdgen.endpoint import EndpointEngine
from kdgen.engine import EngineError
from tests.conftest import TEST_API_KEY, job_config
from tests.test_job import coverage, read_errors, read_records


def chunk_files(out: str) -> list[str]:
    return [n for n in os.listdir(out) if n.endswith(".jsonl")] if os.path.isdir(out) else []


def drain(eng, requests, **extra):
    eng.add_many(requests, **extra)
    out = {}
    while eng.num_unfinished():
        for f in eng.step():
            out[f.request_id] = f
    return out


def endpoint_config(tiny_model, url, **kw):
    """Settings for the session server (its key unless endpoint_api_key is given)."""
    kw.setdefault("endpoint_api_key", TEST_API_KEY)
    return config_mod.from_sources(dict(model_path=tiny_model, dataset_path="-", output_path="-", endpoint=url,
                                        temperature=0.0, concurrency=8, **kw), env={})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("ep-corpus"))
    tiny.make_corpus(d, num_files=3, rows_per_file=60, seed=5)
    return d


def test_same_greedy_tokens_and_logprobs_as_in_process(engine, tiny_model, tokenizer, vllm_server):
    texts = [tiny.paragraph(__import__("random").Random(i), 2) for i in range(24)]
    requests = [(str(i), tokenizer(t, add_special_tokens=False)["input_ids"][:40], 24) for i, t in enumerate(texts)]
    ep = EndpointEngine(endpoint_config(tiny_model, vllm_server.url, logprobs=3))
    try:
        assert ep.model == tiny_model and ep.max_model_len == 512  # auto-detected from /v1/models
        remote = drain(ep, requests)
    finally:
        ep.close()
    engine.set_sampling(job_config(model_path=tiny_model, dataset_path="-", output_path="-", logprobs=3))
    local = drain(engine, requests)
    for rid, _, _ in requests:
        a, b = remote[rid].samples[0], local[rid].samples[0]
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        assert [x[0] for x in a.top_token_ids] == [x[0] for x in b.top_token_ids]
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-3
        meta = remote[rid].metadata
        assert meta["usage"]["completion_tokens"] == len(a.token_ids) and meta["latency_s"] > 0
        assert meta["attempts"] == 1


def test_4xx_is_a_row_error_with_the_servers_message(tiny_model, vllm_server):
    ep = EndpointEngine(endpoint_config(tiny_model, vllm_server.url))
    try:
        out = drain(ep, [("ok", [10, 20, 30], 4), ("bad", [10, 20, 30], 100000)])
    finally:
        ep.close()
    assert out["ok"].error is None and len(out["ok"].samples[0].token_ids) == 4
    assert out["bad"].samples == [] and "HTTP 400" in out["bad"].error and "max_model_len" in out["bad"].error


def test_unreachable_endpoint_fails_with_a_clear_error(tiny_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(EngineError, match=r"unreachable after 2 attempts \(MAX_RETRIES=1\)"):
        EndpointEngine(endpoint_config(tiny_model, f"http://127.0.0.1:{port}/v1", max_retries=1))
    assert time.time() - t0 < 5


def test_too_long_rows_refused_by_the_server_are_recorded(tiny_model, vllm_server, tmp_path):
    """The server's limit is the truth: a row the server refuses (4xx) becomes an error record,
    the rest of the chunk is written, and the audit lists the failed row."""
    data = tmp_path / "long.parquet"
    long_text = " ".join(["mountain river forest"] * 200)
    pq.write_table(pa.table({"text": ["the quick brown fox", long_text, "a small garden"]}), data)
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=str(data), output_path=out, endpoint=vllm_server.url,
                   max_prefill_length=2000, max_target_length=2100, max_tokens=8)
    ep = EndpointEngine(c)
    ep.max_model_len = 4096  # a client that believes the model is longer than the server allows
    try:
        s = runner.run(c, engine=ep)
    finally:
        ep.close()
    assert s.rows == 2 and s.error_rows == 1
    errors = read_errors(out)
    assert [e["row_idx"] for e in errors] == [1] and "HTTP 400" in errors[0]["error"]
    report = status.audit(out)
    assert report["ok"] and report["rows_failed"] == 1 and report["failed_rows"][0]["row_idx"] == 1


def test_server_killed_mid_run_then_restarted_resumes_exactly_once(engine, tiny_model, vllm_server, corpus, tmp_path):
    out = str(tmp_path / "out")
    settings = dict(model_path=tiny_model, dataset_path=corpus, output_path=out, endpoint=vllm_server.url,
                    chunk_size=10, gen_batch_size=8, concurrency=4)
    errors = []

    def first_run():
        try:
            runner.run(job_config(max_retries=1, **settings))
        except runner.JobError as e:
            errors.append(e)

    t = threading.Thread(target=first_run)
    t.start()
    deadline = time.time() + 120
    while not chunk_files(out) and time.time() < deadline:
        time.sleep(0.05)
    vllm_server.kill()  # kill -9 of the whole server (API process and engine core)
    t.join(timeout=120)
    assert errors and "unreachable" in str(errors[0]), "the job should stop once retries are exhausted"
    done_before = len(chunk_files(out))
    assert 1 <= done_before < 18

    # Restart and resume at once: the engine retries /v1/models until the server is up again.
    vllm_server.start()
    try:
        s = runner.run(job_config(max_retries=12, **settings))
    finally:
        vllm_server.wait_ready()
    assert s.chunks_done_before == done_before and s.chunks_committed == 18 - done_before
    report = status.audit(out)
    assert report["ok"] and report["rows_ok"] == 180, status.format_audit(report)
    cov = coverage(read_records(out))
    assert len(cov) == 180 and set(cov.values()) == {1}

    # And the same tokens as the in-process engine (greedy) for the same job.
    ref = str(tmp_path / "ref")
    runner.run(job_config(**{**settings, "endpoint": "", "output_path": ref}), engine=engine)
    key = lambda r: (r["parquet_file"], r["row_idx"])  # noqa: E731
    got = sorted(read_records(out), key=key)
    want = sorted(read_records(ref), key=key)
    assert [r["completion_token_ids"] for r in got] == [r["completion_token_ids"] for r in want]
    assert [r["prompt_token_ids"] for r in got] == [r["prompt_token_ids"] for r in want]
    assert all(r["metadata"]["latency_s"] > 0 and r["metadata"]["usage"]["prompt_tokens"] == len(r["prompt_token_ids"])
               for r in got)


def test_run_all_script_names_missing_env_vars(tmp_path):
    import subprocess

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "DATASET_PATH", "OUTPUT_PATH",
                                                            "GCS_BUCKET_PATH")}
    env["DATASET_PATH"] = str(tmp_path)
    r = subprocess.run([os.path.join(REPO, "scripts", "data_generation", "run_all.sh")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "missing required environment variable(s): MODEL_PATH OUTPUT_PATH" in r.stderr

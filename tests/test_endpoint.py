"""The endpoint engine against a real `vllm serve` of the tiny model (session fixture vllm_server)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import config as config_mod
from kdgen import tiny
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.engines.endpoint import EndpointEngine
from kdgen.engines.base import EngineError
from kdgen.records import naming
from tests.conftest import TEST_API_KEY, job_config
from tests.cut_proxy import CutProxy
from tests.test_job import coverage, read_errors, read_records


def chunk_files(out: str) -> list[str]:
    """The committed chunk objects (temp files of writes in progress are not chunks)."""
    return [n for n in os.listdir(out) if naming.parse_object_name(n)] if os.path.isdir(out) else []


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
    report = audit.audit(out)
    assert report["ok"] and report["rows_failed"] == 1 and report["failed_rows"][0]["row_idx"] == 1


class OnFirstRetry(logging.Handler):
    """Calls `then` once, at the retry policy's first warning of a failed request to `url` (the job
    has seen the server gone). Attach it to kdgen.retry's logger: the one policy logs every retry."""

    def __init__(self, url: str, then):
        super().__init__(logging.WARNING)
        self.url, self.then, self.seen = url, then, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.url in message and "retry 1/" in message and not self.seen.is_set():
            self.seen.set()
            self.then()


def test_server_killed_mid_run_then_restarted_resumes_exactly_once(engine, tiny_model, vllm_server, corpus, tmp_path):
    """The server goes away mid-run (every connection closed, the port refusing, as after a kill -9
    of vllm serve) and comes back: the job stops once its retries are exhausted, keeping its chunks;
    the resumed job, started while the server is still gone, retries until it is back. The session's
    server stays up behind a CutProxy: the client sees what it sees of a killed and restarted
    server, without a second server start."""
    proxy = CutProxy(vllm_server.port).up()
    out = str(tmp_path / "out")
    settings = dict(model_path=tiny_model, dataset_path=corpus, output_path=out, endpoint=proxy.url,
                    chunk_size=10, gen_batch_size=8, concurrency=4)
    errors = []

    def first_run():
        try:
            runner.run(job_config(max_retries=1, **settings))
        except runner.JobError as e:
            errors.append(e)

    t = threading.Thread(target=first_run)
    t.start()
    deadline = time.time() + 300  # generous: the box may be loaded; the cut must follow a commit
    while not chunk_files(out) and time.time() < deadline:
        time.sleep(0.05)
    proxy.down()  # the server is gone: requests in flight are cut, new connections refused
    t.join(timeout=300)
    assert errors and "unreachable" in str(errors[0]), "the job should stop once retries are exhausted"
    done_before = len(chunk_files(out))
    assert 1 <= done_before < 18, f"{done_before} chunks committed before the cut"

    # Resume at once: the engine retries /v1/models until the server is up again.
    back = OnFirstRetry(proxy.url, proxy.up)
    endpoint_log = logging.getLogger("kdgen.retry")
    endpoint_log.addHandler(back)
    try:
        s = runner.run(job_config(max_retries=12, **settings))
    finally:
        endpoint_log.removeHandler(back)
        proxy.down()
    assert back.seen.is_set(), "the resumed job should have found the server gone at first"
    assert s.chunks_done_before == done_before and s.chunks_committed == 18 - done_before
    report = audit.audit(out)
    assert report["ok"] and report["rows_ok"] == 180, audit.format_audit(report)
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


# ---- credentials (issue 14) ---------------------------------------------------------------------
# The session server wants TEST_API_KEY or TEST_API_KEY_ROTATED (vllm serve --api-key K1 K2).


def test_the_key_is_a_secret_knob_and_the_fingerprint_ignores_it(tmp_path):
    from kdgen import redact
    from kdgen.corpus import jobfile

    flags = dict(model_path="m", dataset_path="d", output_path="o", endpoint="https://kd:url-pass-5678@h/v1")
    a = config_mod.from_sources({**flags, "endpoint_api_key": "sk-first-1234"}, env={})
    b = config_mod.from_sources(flags, env={"ENDPOINT_API_KEY": "sk-rotated-1234"})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint_hash() == b.fingerprint_hash()
    assert "endpoint_api_key" not in a.fingerprint() and "endpoint" not in a.fingerprint()
    block = config_mod.describe(a)
    assert "ENDPOINT_API_KEY='***'" in block and "'https://***@h/v1'" in block
    for text in (block, repr(a), json.dumps(a.fingerprint())):
        assert "sk-first" not in text and "url-pass" not in text
    assert "ENDPOINT_API_KEY=''" in config_mod.describe(config_mod.replace(a, endpoint_api_key=""))
    # _job.json holds the fingerprint and the plan, nothing else from the settings.
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "d.parquet")
    jobfile.prepare(str(tmp_path / "out"), a.fingerprint(), str(tmp_path / "d.parquet"), 10)
    jobfile.prepare(str(tmp_path / "out"), b.fingerprint(), str(tmp_path / "d.parquet"), 10)
    job = (tmp_path / "out" / "_job.json").read_bytes()
    assert b"sk-" not in job and b"url-pass" not in job
    # Any text that reaches a log or an error message.
    assert redact.redact("GET https://kd:url-pass-5678@h/v1 sk-first-1234 sk-rotated-1234") == \
        "GET https://***@h/v1 *** ***"


def test_openai_api_key_is_read_only_when_endpoint_api_key_is_not_set():
    flags = dict(model_path="m", dataset_path="d", output_path="o")
    assert config_mod.from_sources(flags, env={"OPENAI_API_KEY": "sk-o"}).endpoint_api_key == "sk-o"
    assert config_mod.from_sources(flags, env={"OPENAI_API_KEY": "sk-o", "ENDPOINT_API_KEY": "sk-e"}).endpoint_api_key == "sk-e"
    assert config_mod.from_sources({**flags, "endpoint_api_key": "sk-f"},
                                   env={"OPENAI_API_KEY": "sk-o", "ENDPOINT_API_KEY": "sk-e"}).endpoint_api_key == "sk-f"
    assert config_mod.from_sources(flags, env={}).endpoint_api_key == ""
    with pytest.raises(config_mod.ConfigError, match="holds whitespace or a control character") as e:
        config_mod.from_sources(flags, env={"ENDPOINT_API_KEY": "sk-from-a-file-99\n"})
    assert "sk-from-a-file" not in str(e.value)
    with pytest.raises(config_mod.ConfigError, match="must be an http") as e:
        config_mod.from_sources({**flags, "endpoint": "ftp://kd:ftp-pass-77@h/v1"}, env={})
    assert "ftp-pass" not in str(e.value)


def test_log_lines_and_tracebacks_are_redacted():
    import io
    import logging

    from kdgen import redact

    redact.register("sk-logged-4321")
    stream = io.StringIO()
    logger = logging.getLogger("kdgen-test-redact")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    redact.install_log_filter(logger)
    try:
        logger.warning("key %s, url %s, header %s", "sk-logged-4321", "http://u:url-pass-1@h/v1",
                       {"Authorization": "Bearer abcdefghijklmnop"})
        try:
            raise RuntimeError("failed with sk-logged-4321")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "sk-logged" not in text and "url-pass" not in text and "abcdefghijklmnop" not in text
    assert "key ***, url http://***@h/v1" in text and "RuntimeError: failed with ***" in text


def test_missing_or_wrong_key_stops_before_any_request_is_blamed_on_a_row(tiny_model, vllm_server):
    with pytest.raises(EngineError) as e:
        EndpointEngine(endpoint_config(tiny_model, vllm_server.url, endpoint_api_key=""))
    assert str(e.value) == (f"endpoint {vllm_server.url} wants credentials (HTTP 401 on GET /models) and none "
                            f"were given: set ENDPOINT_API_KEY (or OPENAI_API_KEY)")
    with pytest.raises(EngineError) as e:
        EndpointEngine(endpoint_config(tiny_model, vllm_server.url, endpoint_api_key="sk-wrong-key-0001"))
    assert str(e.value).startswith(f"endpoint {vllm_server.url} refused the API key (HTTP 401 on GET /models)")
    assert "sk-wrong" not in str(e.value) and "\n" not in str(e.value)
    # The rotated key is as good as the first one.
    EndpointEngine(endpoint_config(tiny_model, vllm_server.url, endpoint_api_key=vllm_server.api_keys[1])).close()


def test_key_revoked_mid_run_stops_the_job_keeps_finished_chunks_and_blames_no_row(tiny_model, vllm_server,
                                                                                  tmp_path):
    """401 on /v1/completions while the job runs is the server's answer about us: the job stops
    (JobError, one line, never the key), finished chunks stay, no error record is written, and a
    rerun with a good key completes every row exactly once."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    tiny.make_corpus(data, num_files=2, rows_per_file=30, seed=9)
    c = job_config(model_path=tiny_model, dataset_path=data, output_path=out, endpoint=vllm_server.url,
                   chunk_size=10, gen_batch_size=8, concurrency=4)
    ep = EndpointEngine(c)
    errors = []

    def first_run():
        try:
            runner.run(c, engine=ep)
        except runner.JobError as e:
            errors.append(e)

    t = threading.Thread(target=first_run)
    try:
        t.start()
        deadline = time.time() + 120
        while not chunk_files(out) and time.time() < deadline:
            time.sleep(0.01)
        ep._auth.key = "sk-revoked-0003"  # the server stops accepting the job's key
        t.join(timeout=120)
    finally:
        ep.close()
    assert errors and "\n" not in str(errors[0]) and "sk-revoked" not in str(errors[0])
    assert f"endpoint {vllm_server.url} refused the API key (HTTP 401 on POST /completions)" in str(errors[0])
    done_before = len(chunk_files(out))
    assert 1 <= done_before < 6 and read_errors(out) == []
    s = runner.run(c)
    assert s.chunks_done_before == done_before and s.chunks_committed == 6 - done_before and s.error_rows == 0
    report = audit.audit(out)
    assert report["ok"] and report["rows_ok"] == 60 and report["rows_failed"] == 0, audit.format_audit(report)


def test_unknown_model_or_path_stops_the_job_not_the_row(tiny_model, vllm_server):
    """404 (a model the server does not serve, a URL without /v1) is not a row's fault."""
    ep = EndpointEngine(endpoint_config(tiny_model, vllm_server.url))
    try:
        ep._base_body["model"] = "no-such-model"
        ep.add_many([("b", [10, 20, 30], 2)])
        with pytest.raises(EngineError, match=r"HTTP 404 .*no-such-model.* is --endpoint the server's /v1 base URL"):
            while ep.num_unfinished():
                ep.step()
    finally:
        ep.close()
    with pytest.raises(EngineError, match=r"HTTP 404 from http://127\.0\.0\.1:\d+/models"):
        EndpointEngine(endpoint_config(tiny_model, vllm_server.url[:-3]))  # the /v1 forgotten


def test_authenticated_job_from_the_cli_leaks_the_key_nowhere(tiny_model, vllm_server, tmp_path):
    """`kdgen run` in a subprocess against `vllm serve --api-key`: a wrong key (and a password in
    the URL) stops it with one line and exit 1; the key resumes the same OUTPUT_PATH (the key is no
    part of the fingerprint), the rotated key, read from OPENAI_API_KEY, finishes it; no byte of the
    output directory, the logs or `kdgen status` holds a key or the password."""
    import subprocess

    from tests.conftest import PYTHON

    key, rotated = vllm_server.api_keys
    wrong, url_pass = "sk-wrong-" + key[-8:], "url-pass-" + key[-8:]
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    tiny.make_corpus(data, num_files=2, rows_per_file=20, seed=3)
    base = {k: v for k, v in os.environ.items() if k not in ("ENDPOINT_API_KEY", "OPENAI_API_KEY")}
    base.update(MODEL_PATH=tiny_model, DATASET_PATH=data, OUTPUT_PATH=out, ENDPOINT=vllm_server.url,
                TEMPERATURE="0", MAX_PREFILL_LENGTH="32", MAX_TARGET_LENGTH="48", CHUNK_SIZE="10",
                CONCURRENCY="4", LOG_EVERY_S="0.2", KDGEN_LOG_LEVEL="DEBUG")
    logs = []

    def kdgen(*args, **env):
        r = subprocess.run([PYTHON, "-m", "kdgen.cli", *args], env={**base, **env}, capture_output=True,
                           text=True, timeout=300)
        logs.append(r.stdout + r.stderr)
        return r

    hostport = vllm_server.url.split("//")[1]
    r = kdgen("run", ENDPOINT=f"http://kd:{url_pass}@{hostport}", ENDPOINT_API_KEY=wrong)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("kdgen: error:")]
    assert errors == [f"kdgen: error: endpoint {vllm_server.url} refused the API key (HTTP 401 on GET /models): "
                      f"set ENDPOINT_API_KEY (or OPENAI_API_KEY) to a key this server accepts"], r.stderr
    assert "Traceback" not in r.stderr
    assert "ENDPOINT_API_KEY='***'" in r.stderr and f"'http://***@{hostport}'" in r.stderr

    r = kdgen("run", ENDPOINT_API_KEY=key, OPENAI_API_KEY=wrong, MAX_CHUNKS="2")
    assert r.returncode == 0 and "done: 2 chunks committed here" in r.stdout, r.stderr
    r = kdgen("run", OPENAI_API_KEY=rotated)
    assert r.returncode == 0 and "done: 2 chunks committed here (2 were already done" in r.stdout, r.stderr
    shown = kdgen("status", out)
    assert shown.returncode == 0 and "4/4 chunks done" in shown.stdout, shown.stderr
    assert audit.audit(out)["ok"]

    secrets = [s.encode() for s in (key, rotated, wrong, url_pass)]
    files = [p for p in __import__("pathlib").Path(out).rglob("*") if p.is_file()]
    assert any("_hosts" in str(p) for p in files) and len(chunk_files(out)) == 4
    for p in files:
        body = p.read_bytes()
        assert not any(s in body for s in secrets), f"a secret in {p}"
    for text in logs:
        assert not any(s.decode() in text for s in secrets)

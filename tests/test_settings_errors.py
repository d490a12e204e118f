"""Issue 19, items 1-6 and 10: a settings mistake is refused before anything is written (exit 2,
one line naming the knob), or stops the job; it never becomes per-row error records."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import config, storage, tiny
from kdgen.corpus import jobfile
from kdgen.fleet import partial
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.records import builders, chunk_object, naming
from kdgen.corpus.dataset import Chunk
from kdgen.prompts import Prompt
from tests.conftest import PYTHON, REPO, job_config
from tests.test_faults import SCRIPT, job_env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("corpus"))
    tiny.make_corpus(d, num_files=1, rows_per_file=8, seed=5)
    return d


def kdgen(*args, env=None, timeout=300):
    base = {k: v for k, v in os.environ.items() if k not in ("HOST_INDEX", "NUM_HOSTS")}
    return subprocess.run([PYTHON, "-m", "kdgen.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**base, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})


def refused(r, *words) -> str:
    """The run was refused as a settings error: exit 2, the last line names the problem."""
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert last.startswith("kdgen: error: "), r.stderr[-3000:]
    for w in words:
        assert w in last, last
    assert "Traceback" not in r.stderr
    return last


def run_args(model, data, out, *extra):
    return ("run", "--model_path", model, "--dataset_path", data, "--output_path", out, "--dtype", "float32",
            "--max_model_len", "512", "--temperature", "0", *extra)


# ---- 1. LOGPROBS against the model -------------------------------------------------------------

def test_logprobs_beyond_the_vocabulary_is_refused_before_the_pin(tiny_model, corpus, tmp_path):
    out = str(tmp_path / "out")
    r = kdgen(*run_args(tiny_model, corpus, out), env={"LOGPROBS": "1000"})
    refused(r, "LOGPROBS / --logprobs 1000", "vocabulary (512 tokens")
    assert not os.path.exists(out)  # nothing pinned, nothing written


# ---- 1. a row quarantined without proof fails the audit ----------------------------------------

def _output_with_error(tmp_path, error: str) -> str:
    data, out = tmp_path / "c", str(tmp_path / "out")
    data.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["one row", "another"]}), str(data / "a.parquet"))
    c = job_config(model_path="m", dataset_path=str(data), output_path=out)
    chunk = runner.prepare(c, {"text": "string"}).chunks[0]
    records = [{"parquet_file": chunk.file, "row_idx": 0, "sample_idx": 0, "prefix": "one row", "generated": "x"}]
    bad = Prompt(1, [], 0, error=error, error_kind="quarantined")
    assert chunk_object.commit_chunk(c, chunk, records + builders.records(c, chunk, bad, None),
                               [builders.error_record(chunk, bad)])
    return out


def test_the_audit_fails_on_a_quarantine_that_isolation_did_not_prove(tmp_path):
    # What kdgen before this fix wrote for rows of a job-wide failure (every row died alone).
    unproven = f"{partial.QUARANTINE_PREFIX} 2 times (the last time alone in the engine): EngineDeadError"
    report = audit.audit(_output_with_error(tmp_path / "a", unproven))
    assert not report["ok"] and report["rows_failed_not_data"] == 1
    assert report["not_data_errors"][0]["error_kind"] == "quarantined_unproven"
    assert "audit FAILED" in audit.format_audit(report)
    proven = (f"{partial.QUARANTINE_PREFIX} 2 times (the last time alone in the engine, while 7 "
              f"{partial.PROOF_MARK}): EngineDeadError")
    report = audit.audit(_output_with_error(tmp_path / "b", proven))
    assert report["ok"] and report["rows_failed"] == 1


def test_an_engine_that_dies_on_every_row_stops_the_job_and_quarantines_none(tiny_model, tmp_path):
    """Every request kills the engine (FAKE_ENGINE die_on tokens every row starts with): after its
    restart and the rows' second death (now in isolation: MAX_CHUNK_ATTEMPTS=1) the job stops with
    a line that blames the engine or the settings, exit 1, no error record; the audit fails. (What
    isolation does with a row that dies alone without proof: the scheduler test below.)"""
    from tests.test_fleet import marked_corpus, marker_ids

    rows = list(range(8))
    data = marked_corpus(str(tmp_path / "c"), 8, rows)
    out = str(tmp_path / "out")
    env = job_env(tiny_model, data, out, CHUNK_SIZE="8", GEN_BATCH_SIZE="4", MAX_CHUNK_ATTEMPTS="1",
                  ENGINE_RESTARTS="1", FAKE_ENGINE="die_on=" + marker_ids(tiny_model, data, rows))
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "the engine failed on every request it was given and none finished" in last, last
    assert "becomes an error record" not in r.stderr
    assert not [n for n in os.listdir(out) if naming.parse_object_name(n)]
    report = audit.audit(out)
    assert not report["ok"] and report["rows_failed"] == 0 and len(report["missing_chunks"]) == 1


# ---- 2. a tokenizer that does not fit the model ------------------------------------------------

def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_model, corpus, tmp_path):
    big = tiny.make_tokenizer(str(tmp_path / "tok"), vocab_size=1024)
    out = str(tmp_path / "out")
    r = kdgen(*run_args(tiny_model, corpus, out), env={"TOKENIZER_PATH": big})
    refused(r, "TOKENIZER_PATH", "vocab_size 512", "not this model's tokenizer")
    assert not os.path.exists(out)


def test_a_tokenizer_with_other_special_tokens_is_refused(tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.eos_token = "<|end_of_text|>"  # id 1; the model's config.json says eos_token_id 4
    other = str(tmp_path / "tok")
    tok.save_pretrained(other)
    r = kdgen(*run_args(tiny_model, corpus, str(tmp_path / "out")), env={"TOKENIZER_PATH": other})
    refused(r, "TOKENIZER_PATH", "eos token is id 1", "eos_token_id [4]")


# ---- 3. misspelt env knobs ---------------------------------------------------------------------

def test_misspelt_env_knobs_are_named_and_strict_env_refuses_them(corpus):
    env = {"TEMPRATURE": "0", "NUM_SAMPLE": "4", "TENSOR_PARALEL_SIZE": "8"}
    r = kdgen("plan", "--dataset_path", corpus, env=env)
    assert r.returncode == 0, r.stderr
    for var, knob in (("TEMPRATURE", "TEMPERATURE"), ("NUM_SAMPLE", "NUM_SAMPLES"),
                      ("TENSOR_PARALEL_SIZE", "TENSOR_PARALLEL_SIZE")):
        assert f"env {var} is not a kdgen knob and is ignored; did you mean {knob}?" in r.stderr
    r = kdgen("plan", "--dataset_path", corpus, env={**env, "STRICT_ENV": "1"})
    refused(r, "env NUM_SAMPLE", "did you mean NUM_SAMPLES?", "STRICT_ENV=1")


def test_other_tools_env_vars_are_not_near_misses():
    env = {"PATH": "/bin", "HOME": "/root", "HOSTNAME": "h", "LANG": "C", "SHELL": "/bin/sh", "USER": "u",
           "TMPDIR": "/tmp", "PWD": "/", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "GCS_BUCKET_PATH": "gs://b/o", "TOKENIZERS_PARALLELISM": "false", "TPU_WORKER_ID": "0",
           "WORLD_SIZE": "2", "RANK": "0", "STORAGE_EMULATOR_HOST": "h", "OPENAI_API_KEY": "k",
           "TEMPERATURE": "0", "SEED": "1", "Temprature": "lower case is not ours"}
    assert config.near_miss_env(env) == []
    assert config.near_miss_env({"NUM_HOST": "2", "MAX_TOKEN": "5"}) == [("MAX_TOKEN", "MAX_TOKENS"),
                                                                         ("NUM_HOST", "NUM_HOSTS")]


# ---- 4. every numeric knob range-checked and finite --------------------------------------------

@pytest.mark.parametrize("var,value", [
    ("LIMIT", "-5"), ("MAX_TOKENS", "-5"), ("MAX_MODEL_LEN", "-1"), ("MAX_CHUNKS", "-3"), ("LEASE_TTL_S", "inf"),
    ("LOG_EVERY_S", "-1"), ("REQUEST_TIMEOUT_S", "-1"), ("TEMPERATURE", "inf"), ("TEMPERATURE", "nan"),
    ("TOP_P", "nan"), ("SEED", "-1"), ("STORAGE_DEADLINE_S", "inf"), ("STALL_TIMEOUT_S", "inf"),
    ("CHECKPOINT_EVERY_S", "nan"), ("PREEMPT_GRACE_S", "-1"), ("GPU_MEMORY_UTILIZATION", "inf"),
    ("REQUEST_TIMEOUT_S", "inf"), ("MAX_TARGET_LENGTH", "-5"), ("CONCURRENCY", "0"), ("MAX_RETRIES", "-1"),
])
def test_a_bad_number_is_one_line_naming_the_knob(var, value):
    env = {"MODEL_PATH": "m", "DATASET_PATH": "d", "OUTPUT_PATH": "o", var: value}
    if var == "MAX_TARGET_LENGTH":
        env["MAX_TOKENS"] = "8"
    with pytest.raises(config.ConfigError, match=f"--{var.lower()} ") as e:
        config.from_sources(env=env)
    assert "\n" not in str(e.value)


def test_every_numeric_knob_refuses_some_value():
    """Each int/float field of JobConfig has a range check: -1 or inf is refused for every one."""
    base = {"MODEL_PATH": "m", "DATASET_PATH": "d", "OUTPUT_PATH": "o"}
    unchecked = []
    for name, kind in config.FIELD_TYPES.items():
        if kind not in ("int", "float"):
            continue
        bad = [v for v in ("-1", "-5", "inf", "nan", "0") if not _accepted(base, name, v)]
        if not bad:
            unchecked.append(name)
    assert unchecked == [], unchecked


def _accepted(base, name, value) -> bool:
    try:
        config.from_sources(env={**base, name.upper(): value})
        return True
    except config.ConfigError:
        return False


def test_numbers_are_refused_through_the_cli_before_the_engine_starts(tiny_model, corpus, tmp_path):
    out = str(tmp_path / "out")
    refused(kdgen(*run_args(tiny_model, corpus, out), env={"MAX_TOKENS": "-5"}), "--max_tokens", "-5")
    r = kdgen(*run_args(tiny_model, corpus, out)[:-2], env={"TEMPERATURE": "inf"})
    refused(r, "--temperature (TEMPERATURE) must be a finite number")
    assert "vLLM" not in r.stderr and not os.path.exists(out)


# ---- 5. a bad MODEL_PATH before the pin; a job that never started may be re-pinned -------------

def test_a_bad_model_path_is_refused_before_the_pin(tmp_path, corpus):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(kdgen(*run_args(str(empty), corpus, out)), "MODEL_PATH", "no config.json")
    assert not os.path.exists(out)
    nothing = str(tmp_path / "nothing")
    refused(kdgen(*run_args(nothing, corpus, out)), "MODEL_PATH", nothing)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text(json.dumps({"vocab_size": 512}))
    (no_tok / "model.safetensors").write_bytes(b"\0" * 8)
    refused(kdgen(*run_args(str(no_tok), corpus, out)), "MODEL_PATH", "no usable tokenizer")
    assert not os.path.exists(out)


def _prepare(out, corpus, **kw):
    c = job_config(model_path="m", dataset_path=corpus, output_path=out, **kw)
    return c, runner.prepare(c, {"text": "string"})


def test_a_job_with_no_chunk_object_is_re_pinned_with_new_settings(tmp_path, corpus):
    out = str(tmp_path / "out")
    _prepare(out, corpus, max_model_len=4096)  # pinned, then the engine failed to start
    c, _ = _prepare(out, corpus)  # corrected: accepted, and re-pinned
    body, _ = jobfile.read(out)
    assert body["fingerprint"]["max_model_len"] == 512
    assert body["repinned"][0]["old_fingerprint"]["max_model_len"] == 4096
    # Once a host started working under it, or a chunk exists, other settings are refused.
    jobfile.mark_started(out, c.fingerprint(), "host-a", 30.0)
    with pytest.raises(jobfile.FingerprintMismatch, match="temperature"):
        _prepare(out, corpus, temperature=0.5)


def test_no_re_pin_under_a_live_lease_or_a_chunk_object(tmp_path, corpus):
    out = str(tmp_path / "out")
    c, plan = _prepare(out, corpus)
    claim = storage.join(out, jobfile.CLAIMS_DIR, plan.chunks[0].name + ".json")
    storage.write_bytes(claim, json.dumps({"owner": "h:0", "expires_at": 4e9}).encode())
    with pytest.raises(jobfile.FingerprintMismatch):
        _prepare(out, corpus, temperature=0.5)
    storage.write_bytes(claim, json.dumps({"owner": "h:0", "expires_at": 1.0}).encode())  # expired: no holder
    _prepare(out, corpus, temperature=0.5)
    c2 = job_config(model_path="m", dataset_path=corpus, output_path=out, temperature=0.5)
    assert chunk_object.commit_chunk(c2, plan.chunks[0], [], [])
    with pytest.raises(jobfile.FingerprintMismatch):
        _prepare(out, corpus, temperature=0.7)


def test_hosts_re_pinning_at_once_on_gcs_agree(gcs_server, corpus):
    """Eight hosts start at once with the corrected settings on an output pinned to bad ones:
    one compare-and-swap wins, the others read its job file and accept it."""
    out = gcs_server.url("repin-race")
    _prepare(out, corpus, max_model_len=4096)
    errors = []

    def host():
        try:
            _prepare(out, corpus)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=host) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    body, _ = jobfile.read(out)
    assert body["fingerprint"]["max_model_len"] == 512 and len(body["repinned"]) == 1
    # A host that started under the old pin learns of the re-pin before its first claim.
    old = job_config(model_path="m", dataset_path=corpus, output_path=out, max_model_len=4096)
    with pytest.raises(jobfile.FingerprintMismatch):
        jobfile.mark_started(out, old.fingerprint(), "late-host", 30.0)


# ---- 10. unsupported URL schemes and missing buckets -------------------------------------------

def test_s3_and_unknown_schemes_are_settings_errors(tiny_model, corpus, tmp_path):
    refused(kdgen("plan", "--dataset_path", "s3://bucket/data"), "DATASET_PATH s3://bucket/data",
            "unsupported URL scheme s3://")
    refused(kdgen("plan", "--dataset_path", corpus, "--output_path", "s3://bucket/out"), "OUTPUT_PATH",
            "unsupported URL scheme s3://")
    refused(kdgen(*run_args(tiny_model, corpus, "s3://bucket/out")), "OUTPUT_PATH s3://bucket/out", "s3://")
    refused(kdgen(*run_args(tiny_model, "hdfs://nn/data", str(tmp_path / "o"))), "DATASET_PATH", "hdfs://")
    refused(kdgen(*run_args("s3://b/model", corpus, str(tmp_path / "o"))), "MODEL_PATH", "s3://")


def test_a_missing_bucket_is_a_settings_error(gcs_server, tiny_model, corpus):
    env = {"STORAGE_EMULATOR_HOST": gcs_server.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    refused(kdgen("plan", "--dataset_path", corpus, "--output_path", "gs://no-such-bucket/out", env=env),
            "OUTPUT_PATH gs://no-such-bucket/out", "bucket 'no-such-bucket' does not exist")
    refused(kdgen("plan", "--dataset_path", "gs://no-such-bucket/data", env=env), "DATASET_PATH",
            "bucket 'no-such-bucket' does not exist")
    refused(kdgen(*run_args(tiny_model, corpus, "gs://no-such-bucket/out"), env=env),
            "OUTPUT_PATH gs://no-such-bucket/out", "does not exist")
    # The bucket that exists is fine (plan of a gs:// output).
    r = kdgen("plan", "--dataset_path", corpus, "--output_path", gcs_server.url("plan-ok"), env=env)
    assert r.returncode == 0, r.stderr


# ---- 1. an endpoint that refuses every request for a settings reason -----------------------------

def test_an_endpoint_refusing_every_request_stops_the_job_and_blames_no_row(tiny_model, vllm_server, tmp_path):
    """`vllm serve` caps logprobs at 20 (--max-logprobs): LOGPROBS=25 is refused on every request
    with the same HTTP 400. The job stops (JobError: exit 1), writes no chunk object and no error
    record; the audit fails."""
    data = tmp_path / "c"
    tiny.make_corpus(str(data), num_files=1, rows_per_file=12, seed=2)
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=str(data), output_path=out, endpoint=vllm_server.url,
                   logprobs=25, chunk_size=6, concurrency=4)
    with pytest.raises(runner.JobError) as e:
        runner.run(c)
    line = str(e.value)
    assert "refused all" in line and "HTTP 400" in line and "not the rows" in line, line
    assert not [n for n in os.listdir(out) if naming.parse_object_name(n)]
    assert not os.path.exists(os.path.join(out, naming.ERRORS_DIR))
    assert not audit.audit(out)["ok"]


def test_a_refusing_endpoint_through_the_cli_exits_1_with_one_line(tiny_model, vllm_server, tmp_path):
    data = tmp_path / "c"
    tiny.make_corpus(str(data), num_files=1, rows_per_file=4, seed=2)
    r = kdgen("run", "--endpoint", vllm_server.url, "--model_path", tiny_model, "--dataset_path", str(data),
              "--output_path", str(tmp_path / "out"), "--logprobs", "25", "--temperature", "0",
              env={"ENDPOINT_API_KEY": vllm_server.api_key, "MAX_PREFILL_LENGTH": "32", "MAX_TARGET_LENGTH": "48"})
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error: ") and "refused all 4 requests" in last, last


# ---- 6. an engine that cannot start says why, in kdgen's own line -------------------------------

@pytest.mark.engine  # vLLM engines in subprocesses
def test_an_engine_start_failure_names_its_root_cause(tiny_model, corpus, tmp_path):
    """GPU_MEMORY_UTILIZATION beyond the free memory (on the CPU engine: of RAM, with
    VLLM_CPU_KVCACHE_SPACE unset) fails in the EngineCore process; its exception is the line."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    r = subprocess.run([PYTHON, "-m", "kdgen.cli", *run_args(tiny_model, corpus, str(tmp_path / "out")),
                        "--enforce_eager", "true", "--gpu_memory_utilization", "0.99"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error: vLLM could not start for MODEL_PATH"), last
    assert "See root cause above" not in last and "Error: " in last.split("MODEL_PATH", 1)[1], r.stderr[-6000:]


# ---- 2. prompts made of the unknown token: a loud warning ----------------------------------------

def word_level_tokenizer(out_dir: str) -> str:
    """A 64-token tokenizer with the model's special tokens at the model's ids, an <unk>, and few
    words: most words of the corpus become <unk> (the fit passes: nothing beyond the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tiny.SPECIAL_TOKENS + ["<unk>"])}
    for w in tiny.WORDS[:64 - len(vocab)]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return out_dir


def test_prompts_of_unknown_tokens_are_warned_about_in_the_summary_and_status(engine, tiny_model, corpus, tmp_path):
    tok_dir = word_level_tokenizer(str(tmp_path / "tok"))
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, tokenizer_path=tok_dir, dataset_path=corpus, output_path=out)
    s = runner.run(c, engine=engine)
    assert s.prompt_tokens and s.unknown_prompt_tokens > 0.02 * s.prompt_tokens
    assert "WARNING: " in s.line() and "of prompt tokens" in s.line() and "unknown token" in s.line()
    shown = kdgen("status", out)
    assert "of prompt tokens" in shown.stdout and "are the tokenizer's unknown token" in shown.stdout, shown.stdout
    # The model's own tokenizer: no warning.
    s = runner.run(job_config(model_path=tiny_model, dataset_path=corpus, output_path=str(tmp_path / "o2")),
                   engine=engine)
    assert s.unknown_prompt_tokens == 0 and "WARNING" not in s.line()


def test_the_scheduler_quarantines_a_row_dying_alone_only_once_a_neighbour_finished():
    """Engine-free, on the real Schedule: a row that kills the engine alone before any row of its
    chunk finished is queued again (last), not quarantined; after a neighbour finished, the same
    death quarantines it, with the proof in its error text."""
    from kdgen.worker.custody import Custodian
    from kdgen.worker.handoff import Handoff
    from kdgen.worker.saves import PartialSaves
    from kdgen.worker.schedule import Schedule
    from kdgen.worker.summary import Summary
    from kdgen.worker.work import ChunkWork
    from kdgen.engines.base import EngineError, Finished, Sample

    c = job_config(model_path="m", dataset_path="d", output_path="o", max_chunk_attempts=1)
    custodian = Custodian("o", claims=None, heartbeat=None, saver=None)
    sched = Schedule(c, Handoff(), custodian, Summary(), PartialSaves(c, saver=None), commit=lambda work: None,
                     owner="test", isolate=True)
    work = ChunkWork(Chunk("a.parquet", "a", 0, 3), custodian.take("a", None), [Prompt(i, [1, 2, 3], 4) for i in range(3)])
    work.custody.start_feeding()
    work.started = work.isolating = True
    sched.in_flight["a"] = work

    def dies_alone(i: int, intent: str) -> None:
        sched.alone = (work, intent, {i})
        work.outstanding += 1
        sched.engine_died([(work, i)], EngineError("vLLM engine died: EngineDeadError"))

    work.groups = [[1], [2]]
    dies_alone(0, "t-1")
    assert work.quarantined == {} and work.groups[-1] == [0]  # runs again after the others
    work.results[1] = Finished("r1", [Sample(0, [7], "x", "length")])  # a neighbour finished alone
    dies_alone(0, "t-2")
    assert list(work.quarantined) == [0] and partial.PROOF_MARK in work.quarantined[0]
    assert audit.error_kind({"error": work.quarantined[0]}) == "quarantined"


class RefusingServer:
    """A tiny OpenAI-compatible HTTP server on 127.0.0.1 (stdlib): /v1/models names one model;
    /v1/completions answers 400 with `refuse(prompt_ids)`'s message when it gives one, else a
    one-token completion. Stands in for a server whose refusals we choose; the vLLM server
    itself refuses LOGPROBS above its --max-logprobs (test above)."""

    def __init__(self, refuse):
        import http.server

        refuse_fn = refuse

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny", "max_model_len": 512}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                msg = refuse_fn(body["prompt"])
                if msg:
                    self._send(400, {"object": "error", "message": msg, "code": 400})
                else:
                    self._send(200, {"choices": [{"index": 0, "text": "ok", "token_ids": [7],
                                                  "finish_reason": "length"}]})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _drain(ep, requests):
    ep.add_many(requests)
    out = {}
    while ep.num_unfinished():
        for f in ep.step():
            out[f.request_id] = f
    return out


def test_the_endpoint_tells_a_job_wide_refusal_from_a_rows_own(tiny_model):
    from kdgen.engines.endpoint import JOB_WIDE_REFUSALS, EndpointEngine
    from kdgen.engines.base import EngineError

    def conf(url, concurrency=4):
        return config.from_sources(dict(model_path=tiny_model, dataset_path="-", output_path="-", endpoint=url,
                                        temperature=0.0, concurrency=concurrency, max_retries=0), env={})

    same = RefusingServer(lambda ids: "Requested sample logprobs of 25, which is greater than max allowed: 20")
    try:
        for n in (3, 20):  # every request refused: a few (all sent), or many (the first 8)
            ep = EndpointEngine(conf(same.url))
            with pytest.raises(EngineError, match="refused all .* completed none .*max allowed: 20.*not the rows"):
                _drain(ep, [(f"r{i}", [1, 2, i], 4) for i in range(n)])
            ep.close()
    finally:
        same.close()
    # A row's own 400 (its prompt too long: the message names its length) among successes.
    own = RefusingServer(lambda ids: f"prompt of {len(ids)} tokens is too long" if len(ids) > 5 else "")
    try:
        ep = EndpointEngine(conf(own.url))
        requests = [(f"r{i}", [1] * (9 if i % 3 == 0 else 3) + [i], 4) for i in range(30)]
        out = _drain(ep, requests)
        ep.close()
        assert sorted(r for r, f in out.items() if f.error) == sorted(f"r{i}" for i in range(30) if i % 3 == 0)
        assert all("too long" in f.error for f in out.values() if f.error) and len(out) == 30
        # Rows refused before any success are not lost: held back, then handed over as the rows' errors.
        ep = EndpointEngine(conf(own.url))
        out = _drain(ep, [("long1", [1] * 10, 4), ("long2", [1] * 11, 4), ("ok", [1, 2], 4)])
        ep.close()
        assert out["long1"].error and out["long2"].error and out["ok"].error is None
    finally:
        own.close()
    # The server starts refusing everything mid-job with one message: that many in a row stop it.
    state = {"n": 0}

    def later(ids):
        state["n"] += 1
        return "max_tokens must be at least 1" if state["n"] > 4 else ""

    flip = RefusingServer(later)
    try:
        ep = EndpointEngine(conf(flip.url, concurrency=1))  # one request at a time: a deterministic order
        with pytest.raises(EngineError, match=f"refused the last {JOB_WIDE_REFUSALS} requests in a row"):
            _drain(ep, [(f"r{i}", [1, 2], 4) for i in range(20)])
        ep.close()
    finally:
        flip.close()

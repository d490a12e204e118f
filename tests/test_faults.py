"""Faults on the real job: kill -9 of the bash job (on the fake engine: the protocol), a dead vLLM
engine (its EngineCore SIGKILLed from outside), tensor parallel 2, bad model dirs, SIGTERM during
the engine start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from kdgen import tiny
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.records import chunk_object, naming
from tests.conftest import PYTHON, REPO, job_config
from tests.test_job import coverage, read_records

SCRIPT = os.path.join(REPO, "scripts", "data_generation", "run_sequence_kd.sh")


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("big"))
    tiny.make_corpus(d, num_files=3, rows_per_file=120, seed=3)
    return d


def job_env(model, data, out, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HOST_INDEX", "NUM_HOSTS")}
    settings = dict(MODEL_PATH=model, DATASET_PATH=data, GCS_BUCKET_PATH=out, TEMPERATURE="0",
                    MAX_PREFILL_LENGTH="32", MAX_TARGET_LENGTH="48", CHUNK_SIZE="20", GEN_BATCH_SIZE="64",
                    LEASE_TTL_S="30", LOG_EVERY_S="1000", DTYPE="float32", MAX_MODEL_LEN="512",
                    ENFORCE_EAGER="true", KDGEN_PYTHON=PYTHON, VLLM_CPU_KVCACHE_SPACE="1")
    settings.update(extra)
    env.update(settings)
    return env


def chunk_files(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if naming.parse_object_name(n)) if os.path.isdir(out) else []


def wait_for_chunks(proc, out: str, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(chunk_files(out)) < n:
        assert proc.poll() is None, f"job exited early with {proc.returncode}"
        assert time.time() < deadline, "job made no progress"
        time.sleep(0.2)


def engine_core(p: psutil.Process) -> bool:
    try:
        return p.name().startswith("VLLM::EngineCor")  # vLLM's process title, cut to 15 chars
    except psutil.Error:
        return False


def test_script_names_missing_variables():
    r = subprocess.run(["bash", SCRIPT], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing required environment variable(s): MODEL_PATH DATASET_PATH OUTPUT_PATH" in r.stderr


def test_kill_9_then_resume_is_exactly_once(tiny_model, big_corpus, tmp_path):
    # parquet chunk objects here; kill -9 of a JSONL job is covered by test_fleet's preemption test.
    # The fake engine takes ~2 ms per generated token, so that the kill lands between commits.
    fmt = "parquet"
    out = str(tmp_path / "out")
    env = job_env(tiny_model, big_corpus, out, OUTPUT_FILE_FORMAT=fmt, FAKE_ENGINE="token_s=0.002")
    proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_chunks(proc, out, 3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log_text = proc.stdout.read().decode()
    assert "MODEL_PATH" in log_text  # the script printed its resolved settings
    before = {n: open(os.path.join(out, n), "rb").read() for n in chunk_files(out)}
    assert 3 <= len(before) < 18 and all(n.endswith("." + fmt) for n in before)
    for n, body in before.items():  # every object that looks finished is complete
        if fmt == "jsonl":
            assert body.endswith(b"\n") and len(body.splitlines()) == 20
        records, errors = chunk_object.read_chunk_object(os.path.join(out, n))
        assert len(records) == 20 and not errors
    s = runner.run(job_config(model_path=tiny_model, dataset_path=big_corpus, output_path=out,
                              output_file_format=fmt, fake_engine="on"))
    assert s.chunks_done_before == len(before) and s.chunks_committed == 18 - len(before)
    assert all(open(os.path.join(out, n), "rb").read() == b for n, b in before.items())
    cov = coverage(read_records(out))
    assert len(cov) == 360 and set(cov.values()) == {1}
    assert audit.audit(out)["ok"]


@pytest.mark.engine  # vLLM engines in subprocesses
def test_engine_death_keeps_finished_chunks(tiny_model, big_corpus, tmp_path):
    """With no engine restarts left (ENGINE_RESTARTS=0), an engine death stops the job: exit 1, one
    line, finished chunks kept. (Restarts themselves: tests/test_fleet.py.)"""
    out = str(tmp_path / "out")
    proc = subprocess.Popen(["bash", SCRIPT], env=job_env(tiny_model, big_corpus, out, ENGINE_RESTARTS="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_chunks(proc, out, 2)
        cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if engine_core(p)]
        assert cores, "no EngineCore process found"
        for p in cores:
            p.kill()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = proc.stdout.read().decode()
    assert rc == 1, text[-2000:]
    errors = [line for line in text.splitlines() if line.startswith("kdgen: error:")]
    assert len(errors) == 1 and "engine died" in errors[0] and "Finished chunks are safe" in errors[0], text[-3000:]
    assert "(ENGINE_RESTARTS=0 restarts spent)" in errors[0]
    kept = chunk_files(out)
    assert len(kept) >= 2
    for n in kept:
        lines = open(os.path.join(out, n), "rb").read().splitlines()
        assert len(lines) == 20 and all(json.loads(x)["generated"] is not None for x in lines)


@pytest.mark.engine  # vLLM engines in subprocesses
def test_a_hung_engine_core_is_killed_by_the_watchdog(tiny_model, big_corpus, tmp_path):
    """The real engine's side of a hang (the protocol's side: tests/test_fleet.py on the fake
    engine): the EngineCore SIGSTOPped from outside, so step() never returns; the watchdog exits 1
    with its one line and kills the engine's processes, which would otherwise hold the device."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen(["bash", SCRIPT], env=job_env(tiny_model, big_corpus, out, STALL_TIMEOUT_S="4",
                                                          GEN_BATCH_SIZE="4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_chunks(proc, out, 1)
        cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if engine_core(p)]
        assert cores, "no EngineCore process found"
        engine_procs = [c for p in cores for c in [p, *p.children(recursive=True)]]
        for p in cores:
            p.suspend()  # SIGSTOP
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = proc.stdout.read().decode()
    assert rc == 1, text[-2000:]
    last = [line for line in text.splitlines() if line.startswith("kdgen: error:")][-1]
    assert last.startswith("kdgen: error: no request finished for ") and "(STALL_TIMEOUT_S=4)" in last, text[-3000:]
    gone, alive = psutil.wait_procs(engine_procs, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive  # the watchdog killed them


def test_tensor_parallel_2_matches_tp1(engine, tiny_model, big_corpus, tmp_path):
    tp1, tp2 = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    runner.run(job_config(model_path=tiny_model, dataset_path=big_corpus, output_path=tp1, limit=60), engine=engine)
    env = job_env(tiny_model, big_corpus, tp2, TENSOR_PARALLEL_SIZE="2", LIMIT="60",
                  VLLM_CPU_OMP_THREADS_BIND="0|1")
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    key = lambda rec: (rec["parquet_file"], rec["row_idx"])  # noqa: E731
    a = sorted(read_records(tp1), key=key)
    b = sorted(read_records(tp2), key=key)
    assert len(a) == len(b) == 60
    assert [x["completion_token_ids"] for x in a] == [x["completion_token_ids"] for x in b]


def test_not_a_model_dir_is_one_line(tmp_path, big_corpus):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "weights.bin").write_bytes(b"\0" * 16)
    r = subprocess.run([PYTHON, "-m", "kdgen.cli", "run", "--model_path", str(bad), "--dataset_path", big_corpus,
                        "--output_path", str(tmp_path / "out"), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error:") and str(bad) in last



@pytest.mark.engine  # vLLM engines in subprocesses
def test_sigterm_during_the_engine_start_leaves_no_engine_process(tiny_model, big_corpus, tmp_path):
    """A preemption notice before the job loop (nothing leased yet) ends the job by the signal, as
    before, but takes the engine processes being started along: they used to outlive it as
    orphans (ppid 1), holding the accelerator's memory against the next start."""
    proc = subprocess.Popen(["bash", SCRIPT], env=job_env(tiny_model, big_corpus, str(tmp_path / "out")),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    engine_procs = []
    try:
        deadline = time.time() + 180
        while not engine_procs:
            assert time.time() < deadline and proc.poll() is None, "the engine never started"
            try:
                engine_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)
                                if "EngineCore" in " ".join(p.cmdline()) or p.name().startswith("VLLM")]
            except psutil.Error:
                pass
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the start (it takes ~20 s here)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        gone, alive = psutil.wait_procs(engine_procs, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in engine_procs:
            try:
                p.kill()
            except psutil.Error:
                pass

"""Issue 9 end to end through the bash job: a corpus that grows a subfolder, and a read outage of
one input file (503 through the loopback fault proxy) longer than the retries. The protocol is
what is tested: the jobs run on the fake engine (FAKE_ENGINE)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from kdgen import storage, tiny
from kdgen.worker import runner
from kdgen.views import audit
from tests.conftest import PYTHON, REPO, job_config
from tests.test_faults import chunk_files, job_env

SCRIPT = os.path.join(REPO, "scripts", "data_generation", "run_sequence_kd.sh")
pytestmark = pytest.mark.timeout(600)


def stored_rows(out: str) -> collections.Counter:
    """(input file URL, row_idx, sample_idx) -> how many records hold it, over every chunk object."""
    names = [n for n in storage.list_names(out) if n.endswith(".jsonl")]
    cov = collections.Counter()
    for n in names:
        for line in storage.read_bytes(storage.join(out, n)).splitlines():
            r = json.loads(line)
            cov[(r["parquet_file"], r["row_idx"], r["sample_idx"])] += 1
    return cov


def test_a_new_subfolder_is_refused_then_extends_the_job(tiny_model, tmp_path):
    corpus, out = tmp_path / "corpus", str(tmp_path / "out")
    tiny.make_corpus(str(corpus / "part"), num_files=2, rows_per_file=30, seed=11)
    env = job_env(tiny_model, str(corpus), out, FAKE_ENGINE="on")
    first = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {n: open(os.path.join(out, n), "rb").read() for n in chunk_files(out)}
    assert sorted({n.split("_rows_")[0] for n in before}) == ["part__shard-00000", "part__shard-00001"]

    tiny.make_corpus(str(corpus / "extra"), num_files=1, rows_per_file=25, seed=12)
    second = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error: ") and "extra/shard-00000.parquet is not one of the 2 input files pinned" in last
    assert "--extend" in last and {n: open(os.path.join(out, n), "rb").read() for n in chunk_files(out)} == before

    third = runner.run(job_config(model_path=tiny_model, dataset_path=str(corpus), output_path=out, extend=True,
                                  fake_engine="on"))
    assert third.chunks_done_before == len(before) and third.rows == 25
    assert all(open(os.path.join(out, n), "rb").read() == b for n, b in before.items())  # old chunks untouched
    cov = stored_rows(out)
    assert len(cov) == 85 and set(cov.values()) == {1}  # no row stored twice
    audited = subprocess.run([PYTHON, "-m", "kdgen.cli", "audit", out], capture_output=True, text=True, timeout=120)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert audited.stdout.startswith("audit OK: 85/85 rows complete, 0 failed rows")
    assert "extended 1 time(s)" in audited.stdout


def test_read_outage_of_one_file_stops_the_job_and_a_rerun_completes(tiny_model, gcs_server, tmp_path):
    from tests.proxy import FaultProxy
    from tests.test_multihost import upload_corpus

    local = str(tmp_path / "c")
    tiny.make_corpus(local, num_files=3, rows_per_file=40, seed=13)
    data, out = gcs_server.url("outage", "corpus"), gcs_server.url("outage", "out")
    upload_corpus(local, data)
    victim = "shard-00001.parquet"
    key = data.split("/", 3)[3] + "/" + victim
    with FaultProxy(gcs_server.endpoint, mode="fail_key", fail_key=key, lifetime_s=500) as proxy:
        proxy.failing = False  # planning reads every footer; the outage starts once the job is pinned
        env = job_env(tiny_model, data, out, CHUNK_SIZE="10", STORAGE_EMULATOR_HOST=proxy.endpoint,
                      STORAGE_DEADLINE_S="4", FAKE_ENGINE="start_s=10",
                      KDGEN_STORAGE_RETRIES="100")  # the deadline, not the count of attempts, ends the retries
        proc = subprocess.Popen(["bash", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while not storage.exists(storage.join(out, "_job.json")):
                assert proc.poll() is None and time.time() < deadline, "the job did not get to planning"
                time.sleep(0.1)
            proxy.failing = True  # the engine takes 10 s to start (start_s): no chunk was read yet
            stdout, stderr = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert proxy.failed > 0
    errors = [line for line in stderr.splitlines() if line.startswith("kdgen: error:")]
    assert len(errors) == 1 and victim in errors[0] and "STORAGE_DEADLINE_S" in errors[0], stderr[-3000:]
    names = [n for n in storage.list_names(out) if n.endswith(".jsonl")]
    assert not [n for n in names if n.startswith("shard-00001_")]  # no chunk of that file committed
    assert storage.list_names(storage.join(out, "_errors")) == []  # and no row recorded as failed
    assert len(names) < 12

    again = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out, chunk_size=10,
                                  fake_engine="on"))
    assert again.error_rows == 0 and again.chunks_done_before == len(names)
    r = audit.audit(out)
    assert r["ok"] and r["rows_ok"] == 120 and r["rows_failed"] == 0, audit.format_audit(r)
    assert len(stored_rows(out)) == 120 and set(stored_rows(out).values()) == {1}
    assert pq.read_table(os.path.join(local, victim)).num_rows == 40

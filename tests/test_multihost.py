"""Several hosts on one gs:// corpus and output (real fake-gcs-server, real CPU engines)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from kdgen import runner, status, storage, tiny, writer
from tests.conftest import PYTHON, REPO, job_config
from tests.test_faults import job_env

pytestmark = pytest.mark.usefixtures("gcs_server")


def upload_corpus(local_dir: str, url: str) -> None:
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes(storage.join(url, name), f.read())


def gs_chunk_names(out: str) -> list[str]:
    return sorted(n for n in storage.list_names(out) if writer.parse_object_name(n))


def test_single_host_job_on_gs(engine, tiny_model, gcs_server, tmp_path):
    local = str(tmp_path / "c")
    tiny.make_corpus(local, num_files=2, rows_per_file=30, seed=5)
    data, out = gcs_server.url("single", "corpus"), gcs_server.url("single", "out")
    upload_corpus(local, data)
    s = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out), engine=engine)
    assert s.chunks_committed == 4 and s.rows == 60
    record = json.loads(storage.read_bytes(storage.join(out, gs_chunk_names(out)[0])).splitlines()[0])
    assert record["parquet_file"].startswith("gs://")
    assert status.audit(out)["ok"]
    st = status.status(out)
    assert st["chunks_done"] == 4 and st["chunks_pending"] == 0 and st["rows_done"] == 60
    shown = subprocess.run([PYTHON, "-m", "kdgen.cli", "status", out], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "STORAGE_EMULATOR_HOST": gcs_server.endpoint})
    assert shown.returncode == 0 and f"{out}: 4/4 chunks done, 0 leased, 0 pending" in shown.stdout, shown.stderr
    again = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out), engine=engine)
    assert again.chunks_committed == 0 and again.chunks_done_before == 4


@pytest.mark.parametrize("fmt", ["parquet"])  # jsonl on gs://: test_single_host_job_on_gs
def test_three_hosts_one_killed_mid_chunk(tiny_model, gcs_server, tmp_path, fmt):
    local = str(tmp_path / "c")
    tiny.make_corpus(local, num_files=3, rows_per_file=80, seed=6)
    data, out = gcs_server.url(f"multi-{fmt}", "corpus"), gcs_server.url(f"multi-{fmt}", "out")
    upload_corpus(local, data)
    script = os.path.join(REPO, "scripts", "data_generation", "run_sequence_kd.sh")
    procs, logs = [], []
    for host in range(3):
        env = job_env(tiny_model, data, out, HOST_INDEX=str(host), NUM_HOSTS="3", CHUNK_SIZE="10",
                      LEASE_TTL_S="8", GEN_BATCH_SIZE="16", STORAGE_EMULATOR_HOST=gcs_server.endpoint,
                      OUTPUT_FILE_FORMAT=fmt,
                      VLLM_CPU_OMP_THREADS_BIND=str(host % 2))
        log = open(tmp_path / f"host{host}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen(["bash", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    victim = procs[1]
    try:
        # Kill host 1 once it has committed a chunk and holds a lease on another (mid-chunk).
        deadline = time.time() + 300
        while True:
            assert time.time() < deadline, "host 1 never got going"
            assert victim.poll() is None, "host 1 finished before it could be killed"
            if not storage.exists(storage.join(out, "_job.json")):
                time.sleep(0.3)
                continue
            leases = [lease for lease in status.status(out)["leases"] if lease["owner"].endswith(":1")]
            reports = status.host_reports(out)
            done_by_1 = sum(r.get("chunks", 0) for r in reports if r.get("owner", "").endswith(":1"))
            if leases and (done_by_1 >= 1 or len(gs_chunk_names(out)) >= 4):
                break
            time.sleep(0.3)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        for p in (procs[0], procs[2]):
            assert p.wait(timeout=400) == 0, open(tmp_path / f"host{procs.index(p)}.log").read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    audit = subprocess.run([PYTHON, "-m", "kdgen.cli", "audit", out], capture_output=True, text=True,
                           env={**os.environ, "STORAGE_EMULATOR_HOST": gcs_server.endpoint}, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.startswith("audit OK: 240/240 rows complete")
    assert len(gs_chunk_names(out)) == 24 and all(n.endswith("." + fmt) for n in gs_chunk_names(out))


def test_data_parallel_ranks_split_one_host(tiny_model, tmp_path):
    data, out = str(tmp_path / "c"), str(tmp_path / "out")
    tiny.make_corpus(data, num_files=2, rows_per_file=60, seed=7)
    env = job_env(tiny_model, data, out, DATA_PARALLEL_SIZE="2", CHUNK_SIZE="10")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    script = os.path.join(REPO, "scripts", "data_generation", "run_sequence_kd.sh")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "kdgen[dp0]" in r.stderr and "kdgen[dp1]" in r.stderr
    assert status.audit(out)["ok"]
    hosts = status.status(out)["hosts"]
    assert len(hosts) == 2 and sum(h["chunks"] for h in hosts) == 12

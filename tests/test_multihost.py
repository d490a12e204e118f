"""One host on a gs:// corpus and output (real fake-gcs-server, real CPU engine). Several hosts
with kills and preemptions, and data-parallel ranks: tests/test_fleet.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kdgen import storage, tiny
from kdgen.worker import runner
from kdgen.views import audit, status
from kdgen.records import naming
from tests.conftest import PYTHON, job_config

pytestmark = pytest.mark.usefixtures("gcs_server")


def upload_corpus(local_dir: str, url: str) -> None:
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes(storage.join(url, name), f.read())


def gs_chunk_names(out: str) -> list[str]:
    return sorted(n for n in storage.list_names(out) if naming.parse_object_name(n))


def test_single_host_job_on_gs(engine, tiny_model, gcs_server, tmp_path):
    local = str(tmp_path / "c")
    tiny.make_corpus(local, num_files=2, rows_per_file=30, seed=5)
    data, out = gcs_server.url("single", "corpus"), gcs_server.url("single", "out")
    upload_corpus(local, data)
    s = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out), engine=engine)
    assert s.chunks_committed == 4 and s.rows == 60
    record = json.loads(storage.read_bytes(storage.join(out, gs_chunk_names(out)[0])).splitlines()[0])
    assert record["parquet_file"].startswith("gs://")
    assert audit.audit(out)["ok"]
    st = status.status(out)
    assert st["chunks_done"] == 4 and st["chunks_pending"] == 0 and st["rows_done"] == 60
    shown = subprocess.run([PYTHON, "-m", "kdgen.cli", "status", out], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "STORAGE_EMULATOR_HOST": gcs_server.endpoint})
    assert shown.returncode == 0 and f"{out}: 4/4 chunks done, 0 leased, 0 pending" in shown.stdout, shown.stderr
    again = runner.run(job_config(model_path=tiny_model, dataset_path=data, output_path=out), engine=engine)
    assert again.chunks_committed == 0 and again.chunks_done_before == 4

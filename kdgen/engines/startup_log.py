"""What a failing vLLM start wrote: the last lines of file descriptors 1 and 2 (OutputTail) and the
exception line among them that names the root cause (root_cause), for a one-line start error."""

from __future__ import annotations

import os
import re
import threading
import time


class OutputTail:
    """Keeps the last lines written to file descriptors 1 and 2 while active, by this process and
    by the processes it starts meanwhile: vLLM's EngineCore and workers log their start-up failure
    there (vLLM logs to stdout unless VLLM_LOGGING_STREAM says otherwise), while the parent only
    says "Engine core initialization failed. See root cause above". Everything is still written
    where it went; a child keeps the pipes as its stdout/stderr, so the forwarding threads run on
    after the block."""

    def __init__(self, keep: int = 400, fds: tuple[int, ...] = (1, 2)):
        self.lines: list[str] = []
        self.keep, self.fds = keep, fds
        self._saved: dict[int, int] = {}
        self._lock = threading.Lock()

    def __enter__(self):
        import sys

        for fd in self.fds:
            try:
                (sys.stdout if fd == 1 else sys.stderr).flush()
                saved = os.dup(fd)
                read_fd, write_fd = os.pipe()
                os.dup2(write_fd, fd)
                os.close(write_fd)
            except OSError:  # no such descriptor to speak of: leave it alone
                continue
            self._saved[fd] = saved
            threading.Thread(target=self._forward, args=(read_fd, os.dup(saved)), name=f"kdgen-tail-{fd}",
                             daemon=True).start()
        return self

    def _forward(self, read_fd: int, out: int) -> None:
        buf = b""
        with os.fdopen(read_fd, "rb", buffering=0) as src:
            while True:
                chunk = src.read(65536)
                if not chunk:
                    break
                try:
                    os.write(out, chunk)
                except OSError:
                    pass
                buf += chunk
                *done, buf = buf.split(b"\n")
                with self._lock:
                    self.lines.extend(x.decode("utf-8", "replace") for x in done)
                    del self.lines[:-self.keep]
        os.close(out)

    def __exit__(self, *exc):
        import sys

        for fd, saved in self._saved.items():
            (sys.stdout if fd == 1 else sys.stderr).flush()
            os.dup2(saved, fd)  # this process writes where it did before
            os.close(saved)
        if self._saved:
            time.sleep(0.2)  # let the forwarders take in what a failing child wrote last
        self._saved = {}
        return False

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


# `SomeError: message` after the prefixes vLLM puts on its processes' log lines:
# "(EngineCore pid=N) ERROR 12-02 13:43:15 [core.py:1510] ValueError: ...".
EXCEPTION_LINE = re.compile(r"^(?:\([^)]*\) )?(?:[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] )?"
                            r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)(?:: .+)?)$")


def root_cause(log_text: str) -> str:
    """The last exception line of a log that is not a pointer to another ("See root cause above",
    "See stack trace for root cause"): the EngineCore's or its worker's start-up failure; "" if none."""
    found = ""
    for line in log_text.splitlines():
        m = EXCEPTION_LINE.match(line.rstrip())
        if m and "root cause" not in m.group(1):
            found = m.group(1)
    return found[:500]


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__



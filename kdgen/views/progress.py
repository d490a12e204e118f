"""How far the job is: a live line on a terminal, periodic log lines elsewhere, and
OUT/_hosts/{owner}.json for `kdgen status`.

On a terminal (stderr is a TTY) one tqdm line is redrawn in place:

    rows 126/300 | chunks 2/6 | 6087 tok/s | ETA 0m03s | 0 error rows  42%|██████▎        |

Anywhere else (a pipe, a file, a fleet's log collector) a timestamped log line is written every
LOG_EVERY_S seconds instead. Both show this host's view: rows and chunks it finished, of what
was left when it started (chunks finished earlier, by anyone, count as done).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from kdgen import storage
from kdgen.fleet.leases import owner_id
from kdgen.config import RANK_ENV, JobConfig  # data-parallel ranks share one terminal

log = logging.getLogger(__name__)

REDRAW_S = 0.5  # the live line is redrawn at most this often


def format_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def live_line_wanted(stream=None) -> bool:
    """A live line only where a person watches one process: a TTY, not a data-parallel rank."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get(RANK_ENV)


def render(p: dict) -> str:
    """The live line's text (after tqdm's bar) from `Progress.snapshot()`."""
    return (f"rows {p['rows_done']}/{p['rows_todo']} | chunks {p['chunks_done']}/{p['chunks_total']} | "
            f"{p['tokens_per_s']:.0f} tok/s | ETA {format_eta(p['eta_s'])} | {p['error_rows']} error rows")


_open_lines: set = set()


def end_live_lines() -> None:
    """Close live lines a failed job left open, so that its error message starts a new line."""
    for line in list(_open_lines):
        line.close()


class LiveLine:
    """One tqdm line, redrawn in place; its bar counts rows (done and error rows)."""

    def __init__(self, total_rows: int, stream=None):
        from tqdm import tqdm

        cols, rows = size()
        self.bar = tqdm(total=total_rows, file=sys.stderr if stream is None else stream, leave=True,
                        mininterval=0, delay=1e-9, ncols=cols, nrows=rows,  # delay: no empty first frame
                        bar_format="{desc} {percentage:3.0f}%|{bar}|")
        _open_lines.add(self)

    def show(self, p: dict) -> None:
        self.bar.ncols, self.bar.nrows = size()  # follow the terminal's resizes
        self.bar.n = p["rows_done"]
        self.bar.set_description_str(render(p), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        _open_lines.discard(self)
        self.bar.close()


def size() -> tuple[int, int]:
    """The terminal's columns and lines (80 x 24 where it reports none, e.g. a pty nobody sized:
    tqdm would then draw nothing)."""
    import shutil

    return tuple(shutil.get_terminal_size((80, 24)))


UNKNOWN_TOKEN_SHARE = 0.02  # more unknown prompt tokens than this: the tokenizer does not fit the data


def unknown_token_warning(unknown: int, total: int) -> str:
    """"" or a warning that many prompt tokens are the unknown token (for the summary and status)."""
    if not total or unknown <= UNKNOWN_TOKEN_SHARE * total:
        return ""
    return (f"; WARNING: {100 * unknown / total:.0f}% of prompt tokens ({unknown}/{total}) are the tokenizer's "
            f"unknown token: TOKENIZER_PATH (or MODEL_PATH's tokenizer) does not fit the data")


class Progress:
    """Progress of this host: the live line or log lines, and OUT/_hosts/{owner}.json."""

    def __init__(self, c: JobConfig, summary, todo_rows: int, live: bool | None = None, stream=None):
        self.every = c.log_every_s
        self.num_hosts = c.num_hosts
        self.report_url = storage.join(c.output_path, "_hosts", owner_id(c).replace(":", "_") + ".json")
        self.owner = owner_id(c)
        self.s = summary
        self.todo_rows = todo_rows
        self.t0 = time.time()
        self.last = self.t0  # last log line / host report
        self.last_drawn = 0.0
        self.live = LiveLine(todo_rows, stream) if (live_line_wanted(stream) if live is None else live) else None
        if self.live is not None:
            self.live.show(self.snapshot(self.t0))

    def snapshot(self, now: float) -> dict:
        dt = max(now - self.t0, 1e-9)
        rows_s = self.s.rows / dt
        left = max(self.todo_rows - self.s.rows - self.s.error_rows, 0)
        return {
            "rows_done": self.s.rows + self.s.error_rows, "rows_todo": self.todo_rows, "rows": self.s.rows,
            "rows_per_s": rows_s, "error_rows": self.s.error_rows,
            "chunks_done": self.s.chunks_done_before + self.s.chunks_committed, "chunks_total": self.s.chunks_total,
            "generated_tokens": self.s.generated_tokens, "tokens_per_s": self.s.generated_tokens / dt,
            "eta_s": left / (rows_s * self.num_hosts) if rows_s > 0 else (0.0 if left == 0 else float("inf")),
        }

    def maybe_log(self, force: bool = False) -> None:
        now = time.time()
        if self.live is not None and (force or now - self.last_drawn >= REDRAW_S):
            self.last_drawn = now
            self.live.show(self.snapshot(now))
            if force:
                self.live.close()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.live is None:
            p = self.snapshot(now)
            log.info("chunks %d/%d | rows %d (%.1f/s) | errors %d | gen tokens %d (%.0f/s) | ETA %s",
                     p["chunks_done"], p["chunks_total"], p["rows"], p["rows_per_s"], p["error_rows"],
                     p["generated_tokens"], p["tokens_per_s"], format_eta(p["eta_s"]))
        self.report(now, finished=force)

    def report(self, now: float, finished: bool) -> None:
        dt = max(now - self.t0, 1e-9)
        body = {"owner": self.owner, "chunks": self.s.chunks_committed, "rows": self.s.rows,
                "error_rows": self.s.error_rows, "generated_tokens": self.s.generated_tokens,
                "prompt_tokens": self.s.prompt_tokens, "unknown_prompt_tokens": self.s.unknown_prompt_tokens,
                "rows_per_s": self.s.rows / dt, "tokens_per_s": self.s.generated_tokens / dt,
                "started_at": self.t0, "updated_at": now, "finished": finished}
        try:
            storage.write_bytes(self.report_url, json.dumps(body).encode())
        except Exception as e:  # progress reports are best effort; the output is what matters
            log.warning("could not write %s: %s", self.report_url, e)

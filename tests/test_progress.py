"""The live progress line (TTY) and periodic log lines (anything else); console log formats."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest

from kdgen import logs
from kdgen.config import RANK_ENV
from kdgen.views import progress
from kdgen.worker.runner import Summary
from tests.conftest import job_config


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def config(tmp_path, **kw):
    return job_config(model_path="m", dataset_path="d", output_path=str(tmp_path / "out"), **kw)


def test_render_names_rows_chunks_rate_eta_and_errors():
    line = progress.render({"rows_done": 126, "rows_todo": 300, "chunks_done": 2, "chunks_total": 6,
                            "tokens_per_s": 6087.4, "eta_s": 63.0, "error_rows": 3})
    assert line == "rows 126/300 | chunks 2/6 | 6087 tok/s | ETA 1m03s | 3 error rows"
    assert progress.format_eta(float("inf")) == "?" and progress.format_eta(7322) == "2h02m"


def test_live_line_on_a_terminal_redraws_in_place_and_ends_at_the_total(tmp_path):
    term = FakeTerminal()
    s = Summary(chunks_total=4, chunks_done_before=1)
    p = progress.Progress(config(tmp_path), s, todo_rows=30, stream=term)
    assert p.live is not None
    s.rows, s.chunks_committed, s.generated_tokens = 10, 1, 500
    p.last_drawn = 0
    p.maybe_log()
    s.rows, s.error_rows, s.chunks_committed, s.generated_tokens = 28, 2, 3, 1400
    p.maybe_log(force=True)
    text = term.getvalue()
    frames = [f for f in text.split("\r") if f.strip()]
    assert any(f.startswith("rows 10/30 | chunks 2/4 | ") for f in frames), frames
    assert re.match(r"rows 30/30 \| chunks 4/4 \| \d+ tok/s \| ETA 0m00s \| 2 error rows +100%\|", frames[-1]), frames
    assert text.endswith("\n")  # closed: the next line starts below it
    assert (tmp_path / "out" / "_hosts").is_dir()  # the host report for `kdgen status` is still written


def test_no_live_line_off_a_terminal_but_periodic_log_lines(tmp_path):
    pipe = io.StringIO()
    s = Summary(chunks_total=2)
    p = progress.Progress(config(tmp_path, log_every_s=0.0), s, todo_rows=20, stream=pipe)
    assert p.live is None
    s.rows, s.chunks_committed, s.generated_tokens = 20, 2, 900
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("kdgen.views.progress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        p.maybe_log(force=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert pipe.getvalue() == ""
    assert any(r.getMessage().startswith("chunks 2/2 | rows 20 (") for r in records), records


def test_data_parallel_ranks_draw_no_live_line(monkeypatch):
    monkeypatch.setenv(RANK_ENV, "1")
    assert not progress.live_line_wanted(FakeTerminal())
    monkeypatch.delenv(RANK_ENV)
    assert progress.live_line_wanted(FakeTerminal()) and not progress.live_line_wanted(io.StringIO())


@pytest.fixture
def restore_logging():
    """logs.setup changes process-wide logging (and, when quiet, os.environ): put them back."""
    env = dict(os.environ)
    loggers = {name: logging.getLogger(name) for name in ("", "kdgen", "vllm")}
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    yield
    os.environ.clear()
    os.environ.update(env)
    for name, (handlers, level, propagate) in saved.items():
        loggers[name].handlers[:], loggers[name].level, loggers[name].propagate = handlers, level, propagate
    logs.DEFAULTED.clear()


def test_log_format_timestamped_off_a_terminal_short_on_one(restore_logging):
    pipe, term = io.StringIO(), FakeTerminal()
    logs.setup(verbose=True, stream=pipe)
    logging.getLogger("kdgen.worker.runner").info("plan: 3 files")
    logging.getLogger("gcsfs").warning("slow bucket")
    lines = pipe.getvalue().splitlines()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO kdgen: plan: 3 files$", lines[0]), lines
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING gcsfs: slow bucket$", lines[1]), lines
    logs.setup(verbose=True, stream=term)
    import contextlib

    with contextlib.redirect_stderr(term):  # the terminal handler writes through tqdm to sys.stderr
        logging.getLogger("kdgen.worker.runner").info("plan: 3 files")
        logging.getLogger("kdgen.worker.runner").warning("lease lost")
    assert term.getvalue().splitlines() == ["kdgen: plan: 3 files", "kdgen: warning: lease lost"]


def test_quiet_unless_verbose_and_the_users_level_wins(restore_logging, monkeypatch):
    for key in [*logs.QUIET_ENV, logs.VERBOSE_ENV]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    logs.setup(verbose=False, stream=io.StringIO())
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert "ignore::FutureWarning" in os.environ["PYTHONWARNINGS"]
    logs.quiet_cpu_demo()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"  # the user's choice, also in the demo
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    logs.DEFAULTED.clear()
    logs.setup(verbose=False, stream=io.StringIO())
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING" and logging.getLogger("vllm").level == logging.WARNING
    assert logs.take_verbose(["run", "--verbose", "--limit", "3"], env={}) == (True, ["run", "--limit", "3"])
    assert logs.take_verbose(["run"], env={}) == (False, ["run"])
    assert logs.take_verbose(["demo"], env={"KDGEN_VERBOSE": "1"}) == (True, ["demo"])
    assert logs.take_verbose(["demo", "--verbose=false"], env={"KDGEN_VERBOSE": "1"}) == (False, ["demo"])
    with pytest.raises(ValueError, match="env KDGEN_VERBOSE must be true or false, got 'loud'"):
        logs.take_verbose(["run"], env={"KDGEN_VERBOSE": "loud"})

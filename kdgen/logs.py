"""Console logging of the `kdgen` command: kdgen's own lines, and the engine kept quiet.

Quiet by default: vLLM logs warnings and errors only (VLLM_LOGGING_LEVEL=WARNING), in this
process and in the engine processes it starts. They inherit the environment, and vLLM reads it
once, at import: so `setup` runs before anything imports vLLM. The same goes for the other
start-up noise listed in QUIET_ENV. `--verbose` (env KDGEN_VERBOSE=1), an option of every
`kdgen` command rather than a job setting, leaves all of them at their libraries' defaults; a
variable the user set always wins. (Not `VERBOSE`: vLLM reads that name itself, as an integer.)

On a terminal kdgen's lines are short (`kdgen: ...`) and written above the live progress line;
anywhere else (a pipe, a file, a fleet's log collector) each carries a timestamp and a level.
"""

from __future__ import annotations

import logging
import os
import sys

from kdgen import redact
from kdgen.config import parse_bool

RANK_ENV = "KDGEN_DP_RANK"
VERBOSE_ENV = "KDGEN_VERBOSE"

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    # c10 warnings from the engine's workers ("NUMA binding: Using MEMBIND policy ...").
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    # Deprecation notices of vLLM's dependencies, and multiprocessing's exit-time note about
    # shared memory vLLM leaves to its resource tracker.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore:resource_tracker:UserWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DEFAULTED: set[str] = set()  # the QUIET_ENV keys `setup` set (the user had not)


def rank_tag() -> str:
    rank = os.environ.get(RANK_ENV)
    return f"[dp{rank}]" if rank else ""


def take_verbose(argv: list[str], env=None) -> tuple[bool, list[str]]:
    """(verbose?, argv without it): --verbose / --verbose=BOOL / --noverbose anywhere on the
    command line, else env KDGEN_VERBOSE."""
    env = os.environ if env is None else env
    verbose, rest = None, []
    for arg in argv:
        if arg in ("--verbose", "--noverbose"):
            verbose = arg == "--verbose"
        elif arg.startswith("--verbose="):
            verbose = parse_bool(arg.split("=", 1)[1], "--verbose")
        else:
            rest.append(arg)
    if verbose is None:
        verbose = parse_bool(env.get(VERBOSE_ENV, ""), f"env {VERBOSE_ENV}")
    return verbose, rest



class _TerminalHandler(logging.Handler):
    """Writes through tqdm, so that a line logged during the live progress line lands above it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return f"{self.prefix(record)}: {text}"

    def prefix(self, record: logging.LogRecord) -> str:
        return "kdgen" + rank_tag() if record.name.split(".")[0] == "kdgen" else record.name


def vllm_import_level() -> None:
    """vLLM logs a few warnings while it is imported, before it sets up its own logging (they then
    go through the root logger, or bare to stderr): give its logger VLLM_LOGGING_LEVEL up front.
    kdgen.cli calls this at import, so vLLM's spawned engine processes (which import the parent's
    main module first) do it too."""
    try:
        logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    except ValueError:  # not a level name; vLLM will say so itself
        pass


def quiet_cpu_demo() -> None:
    """`kdgen demo` runs a known CPU setup whose engine warns about its build (no Triton, no
    tcmalloc, eager mode): expected there, so unless the user chose a level (or --verbose),
    vLLM logs errors only."""
    if "VLLM_LOGGING_LEVEL" in DEFAULTED:
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
        vllm_import_level()


def _one_line(record: logging.LogRecord) -> bool:
    record.exc_info = None
    record.exc_text = None
    return True


def setup(verbose: bool = False, stream=None) -> None:
    """Configure logging for a `kdgen` command; call it before vLLM is imported."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # data-parallel ranks are `kdgen run` processes too
    else:
        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                DEFAULTED.add(key)
                if key == "PYTHONWARNINGS":  # read at start-up: this process needs the filters too
                    import warnings

                    for category in (FutureWarning, DeprecationWarning):
                        warnings.filterwarnings("ignore", category=category)
    vllm_import_level()
    stream = sys.stderr if stream is None else stream
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    if terminal:
        handler: logging.Handler = _TerminalHandler()
        handler.setFormatter(_ShortFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s kdgen" + rank_tag() + ": %(message)s", datefmt=TIME_FORMAT))
    kdgen_log = logging.getLogger("kdgen")
    kdgen_log.handlers[:] = [handler]
    kdgen_log.setLevel(os.environ.get("KDGEN_LOG_LEVEL", "INFO").upper())
    kdgen_log.propagate = False
    # Other libraries' loggers (gcsfs, fsspec, ...): their warnings and errors, named as theirs.
    other = logging.StreamHandler(stream)
    other.setFormatter(_ShortFormatter("%(message)s") if terminal else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt=TIME_FORMAT))
    if not verbose:  # one line each: gcsfs logs a full traceback per exhausted retry, and
        other.addFilter(_one_line)  # kdgen's storage layer names the failure itself
    root = logging.getLogger()
    root.handlers[:] = [other]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # No credential in any log line, ours or a library's (kdgen's logger does not propagate).
    redact.install_log_filter(root)
    redact.install_log_filter(kdgen_log)

"""The `kdgen` parser, assembled from one module per command, and how a command ends: exit 2 with
one line for bad settings or input, exit 1 with one line for a job that stopped (rerun resumes),
redacted tracebacks for anything else. `--verbose` is taken anywhere on the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kdgen import logs, redact
from kdgen.cli import adopt, audit, demo, export, flags, plan, run, score, show, status

log = logging.getLogger("kdgen")
logs.vllm_import_level()  # also runs in vLLM's spawned engine processes: see there


COMMANDS = (run, score, adopt, plan, status, audit, show, export, demo, flags)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error names the flag and never echoes a value (it may be a key)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact.redact(message)}\n")


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the kdgen parser, {command: its parser})."""
    p = Parser(prog="kdgen", allow_abbrev=False,
               description="kdgen: knowledge-distillation data from a teacher model over a parquet corpus.",
               epilog="--verbose (any command): kdgen's debug lines and vLLM's info lines (env KDGEN_VERBOSE).")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for command in COMMANDS:
        command.register(commands)
    for sub in commands.choices.values():
        sub.allow_abbrev = False  # `--api-k` must never be read as a flag it abbreviates
    return p, commands.choices


def parse(args: list[str]) -> argparse.Namespace:
    """The parsed command line; a flag no command has is refused by name only."""
    p, commands = parser()
    ns, unknown = p.parse_known_args(args)
    if unknown:
        flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), None)
        what = f"unknown flag {flag}" if flag else f"unexpected argument {redact.redact(unknown[0])!r}"
        commands[ns.command].error(f"{what} (see `kdgen {ns.command} --help`)")
    return ns


# Commands that start no engine and no child process. As the process's own entry point they end
# with os._exit once their output is flushed: pyarrow's thread pools (and gcsfs's grpc import) can
# abort the interpreter's teardown ("terminate called without an active exception", exit 134;
# apache/arrow #34314) after all the work was done, and an audit that passed must not exit 134.
HARD_EXIT_COMMANDS = ("adopt", "plan", "status", "audit", "show", "export", "flags")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is not None or not any(a in HARD_EXIT_COMMANDS for a in args[:2]):
        return _main(args)
    try:
        _main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError):  # `kdgen show OUT | head` closed the pipe early
            code = code or 1
    os._exit(code or 0)


def _main(args: list[str]) -> None:
    from kdgen.views.progress import end_live_lines

    try:  # --verbose is an option of every command, taken before the parser sees the arguments
        verbose, args = logs.take_verbose(args)
    except ValueError as e:
        print(f"kdgen: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(verbose=verbose)
    redacted_tracebacks()
    bad_input, stopped = user_errors()
    try:
        ns = parse(args)
        ns.func(ns)
    except (*bad_input, *stopped) as e:  # one line says it all: 2 = fix and rerun, 1 = rerun resumes
        if os.environ.get("KDGEN_DEBUG"):
            raise
        end_live_lines()
        print(f"kdgen: error: {redact.redact(str(e))}", file=sys.stderr)
        sys.exit(2 if isinstance(e, bad_input) else 1)
    except BrokenPipeError:  # `kdgen show OUT | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def redacted_tracebacks() -> None:
    """An unexpected exception's traceback is printed through redact() too."""
    import traceback

    def hook(kind, value, tb):
        sys.stderr.write(redact.redact("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = hook


def user_errors():
    """Errors whose message is the whole story (one line, no traceback): bad settings or input
    (exit 2: fix and rerun), and a job that stopped (exit 1: rerun the same command to resume)."""
    from kdgen.config import ConfigError
    from kdgen.corpus.dataset import DatasetError
    from kdgen.engines.vllm_engine import EngineError
    from kdgen.worker.runner import JobError
    from kdgen.views.show import ShowError
    from kdgen.storage import StorageError
    from kdgen.records.writer import FingerprintMismatch

    return ((ConfigError, DatasetError, FingerprintMismatch, ShowError, FileNotFoundError, ValueError),
            (EngineError, JobError, StorageError))


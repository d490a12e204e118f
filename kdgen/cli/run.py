"""`kdgen run`: generate completions for this host's share of the corpus (resumable, multi-host safe)."""

from __future__ import annotations

import logging
import sys

from kdgen import config as config_mod
from kdgen.cli.job_flags import add_job_flags, job_flags

log = logging.getLogger("kdgen")

HELP = "generate completions for this host's share of the corpus (resumable, multi-host safe)"


def register(commands) -> None:
    p = commands.add_parser("run", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    add_job_flags(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from kdgen.worker import runner

    c = config_mod.from_sources(job_flags(args))
    log.info("settings:\n%s", config_mod.describe(c))
    if c.data_parallel_size > 1:
        from kdgen.worker.parallel import run_ranks

        code = run_ranks(c)
        if code:
            sys.exit(code)
        return
    print(runner.run(c).line())

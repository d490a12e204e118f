"""`kdgen score`: the teacher's logprobs of given texts or prompt/completion pairs, no generation."""

from __future__ import annotations

import logging

from kdgen import config as config_mod
from kdgen.cli.job_flags import add_job_flags, job_flags

log = logging.getLogger("kdgen")

HELP = ("score given texts (TEXT_COLUMN) or prompt/completion pairs (COMPLETION_COLUMN): the teacher's "
        "prompt logprobs (and top-LOGPROBS), written as resumable chunk objects like `run`")


def register(commands) -> None:
    p = commands.add_parser("score", help=HELP.split(":")[0], description=HELP[0].upper() + HELP[1:] + ".")
    add_job_flags(p, skip=("task",))
    p.set_defaults(func=score)


def score(args) -> None:
    from kdgen.worker import runner

    c = config_mod.from_sources({**job_flags(args, skip=("task",)), "task": "score"})
    log.info("settings:\n%s", config_mod.describe(c))
    print(runner.run(c).line())

"""`kdgen adopt OUT`: re-pin an output whose _job.json was lost."""

from __future__ import annotations

from kdgen import config as config_mod
from kdgen.cli.job_flags import add_job_flags, job_flags

HELP = ("re-pin an output whose _job.json was lost: write a new one with these settings (the `run` flags "
        "and env vars; they must be the ones its chunk objects were made with) over the chunk objects it "
        "holds, recorded as adopted (`kdgen audit` reports it). A run over chunk objects without a "
        "_job.json is refused until then.")


def register(commands) -> None:
    p = commands.add_parser("adopt", help="re-pin an output whose _job.json was lost", description=HELP)
    p.add_argument("output_path", help="the output directory (local or gs://)")
    add_job_flags(p, skip=("output_path",), positional="output_path")
    p.set_defaults(func=adopt)


def adopt(args) -> None:
    from kdgen.prompts import input_columns
    from kdgen.worker import runner

    c = config_mod.from_sources({**job_flags(args, skip=("output_path",)), "output_path": args.output_path})
    plan = runner.prepare(c, input_columns(c), adopt=True)
    print(f"adopted: {args.output_path} now pins {plan.summary()}; run the job to generate what is missing")

"""`kdgen audit OUT`: every input row covered exactly once per sample, every chunk object whole."""

from __future__ import annotations

import sys

from kdgen import redact
from kdgen.cli.job_flags import BOOL

HELP = ("check that every input row is covered exactly once per sample and every chunk object is whole "
        "(its content hash) and holds only its own rows; exit 1 on gaps, duplicates or bad objects. "
        "--repair moves the bad chunk objects aside to OUT/_bad/ (with the reason), so that the next run "
        "of the job generates those chunks again")


def register(commands) -> None:
    p = commands.add_parser("audit", help="every row exactly once? (exit 1 if not)", description=HELP)
    p.add_argument("output_path", help="the output directory (local or gs://)")
    p.add_argument("--dataset_path", "--dataset-path", default="",
                   help="the corpus to check against (default: the one pinned in OUT/_job.json)")
    p.add_argument("--repair", **BOOL, help="move bad chunk objects aside to OUT/_bad/")
    p.set_defaults(func=audit)


def audit(args) -> None:
    from kdgen.views import status as status_mod

    report = status_mod.audit(args.output_path, args.dataset_path or None)
    print(redact.redact(status_mod.format_audit(report)))
    if args.repair and report["bad_objects"]:
        moved = status_mod.repair(args.output_path, report)
        print(f"repair: moved {len(moved)} bad chunk objects to {status_mod.BAD_DIR}/ in {args.output_path}; "
              f"run the job again to generate them")
    if not report["ok"]:
        sys.exit(1)

"""`kdgen status OUT`: chunks done / leased / pending, rows, tokens, per-host rates."""

from __future__ import annotations

import json

from kdgen import redact
from kdgen.cli.job_flags import BOOL

HELP = ("chunks done / leased (by whom, until when) / pending, rows, tokens, per-host rates. --watch "
        "refreshes every --every seconds (on a terminal in place) until every chunk is done, or --count "
        "refreshes; it names the slowest working host")


def register(commands) -> None:
    p = commands.add_parser("status", help="chunks done / leased / pending, per-host rates", description=HELP)
    p.add_argument("output_path", help="the output directory (local or gs://)")
    p.add_argument("--as_json", "--as-json", **BOOL, help="print the report as JSON")
    p.add_argument("--watch", **BOOL, help="refresh until every chunk is done")
    p.add_argument("--every", type=float, default=5.0, help="seconds between refreshes (default 5)")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0: until done)")
    p.set_defaults(func=status)


def status(args) -> None:
    from kdgen.views import status as status_mod

    if args.watch or args.count:
        if args.every <= 0:
            raise ValueError(f"--every must be > 0 seconds, got {args.every}")
        try:
            status_mod.watch(args.output_path, every=args.every, count=args.count, as_json=args.as_json)
        except KeyboardInterrupt:
            pass
        return
    report = status_mod.status(args.output_path)
    print(redact.redact(json.dumps(report, indent=2) if args.as_json else status_mod.format_status(report)))

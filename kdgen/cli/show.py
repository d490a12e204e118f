"""`kdgen show OUT`: records and error rows of an output, as text for people."""

from __future__ import annotations

HELP = ("print records (prompt, completion, finish reason, token counts, logprob summary) and error rows "
        "of an output, local or gs://. --chunk NAME: one chunk object; --row FILE:ROW: one input row")


def register(commands) -> None:
    p = commands.add_parser("show", help="print records and error rows of an output", description=HELP)
    p.add_argument("output_path", help="the output directory (local or gs://)")
    p.add_argument("--n", type=int, default=3, help="how many records (default 3)")
    p.add_argument("--chunk", default=None, help="one chunk object, by name")
    p.add_argument("--row", default=None, help="one input row, as FILE:ROW")
    p.set_defaults(func=show)


def show(args) -> None:
    from kdgen.views import show as show_mod

    show_mod.show(args.output_path, n=args.n, chunk=args.chunk, row=args.row)

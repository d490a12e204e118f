"""`kdgen flags`: every job flag with its env var, default and meaning (docs/settings.md's table)."""

from __future__ import annotations

from kdgen import config as config_mod

HELP = "print every job flag with its env var, default and meaning"


def register(commands) -> None:
    p = commands.add_parser("flags", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    p.set_defaults(func=flags)


def flags(args) -> None:
    print(config_mod.flag_table())

"""The job's flags, made from kdgen.config's fields: `--chunk_size` (also `--chunk-size`) for the
knob whose env var is CHUNK_SIZE. Values stay strings here: kdgen.config parses flags and env vars
with one function, so `--temperature 0.7` and TEMPERATURE=0.7 can never mean different things.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from kdgen import config as config_mod


def add_job_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), positional: str = "") -> None:
    parser.usage = f"%(prog)s {positional + ' ' if positional else ''}[--KNOB VALUE ...]   (`kdgen flags` lists them)"
    group = parser.add_argument_group("job flags (each also read from its upper-case env var; `kdgen flags`)")
    for f in fields(config_mod.JobConfig):
        if f.name in skip:
            continue
        spellings = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kind = config_mod.FIELD_TYPES[f.name]
        extra = dict(nargs="?", const="true", metavar="BOOL") if kind == "bool" else dict(metavar=kind.upper())
        shown = "(secret)" if f.name in config_mod.SECRET_FIELDS else repr(f.default)
        group.add_argument(*spellings, dest=f.name, default=None,
                           help=f"{f.name.upper()}, default {shown}: {f.metadata['help']}".replace("%", "%%"),
                           **extra)


def job_flags(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """{knob: value} of the job flags given on the command line (absent ones are left to env vars)."""
    return {f.name: getattr(args, f.name) for f in fields(config_mod.JobConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def parse_bool(value: str) -> bool:
    """`--watch`, `--watch true`, `--watch=0`: the spellings kdgen.config takes for a bool knob."""
    return config_mod.parse_bool(value, "flag")


# A bool option of a command (not a job knob): `--repair` alone, or `--repair true|false`.
BOOL = dict(nargs="?", const=True, default=False, type=parse_bool, metavar="BOOL")

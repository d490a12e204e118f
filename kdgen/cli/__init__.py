"""`kdgen` command line: one module per command (run, score, adopt, plan, status, audit, show,
export, demo, flags), assembled by kdgen.cli.main. Commands are thin: they parse, call the
library, and print. Job flags come from kdgen.config (kdgen.cli.job_flags), so `--help`, the env
vars and docs/settings.md cannot drift apart.
"""

from kdgen.cli.main import main

__all__ = ["main"]

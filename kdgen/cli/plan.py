"""`kdgen plan`: the chunk plan (parquet footers only) and, if OUTPUT_PATH exists, how much is done."""

from __future__ import annotations

from kdgen import config as config_mod
from kdgen.cli.job_flags import add_job_flags, job_flags

HELP = "print the chunk plan (footers only) and, if OUTPUT_PATH exists, how much is done"


def register(commands) -> None:
    p = commands.add_parser("plan", help=HELP, description=HELP[0].upper() + HELP[1:] + ".")
    add_job_flags(p)
    p.set_defaults(func=plan)


def plan(args) -> None:
    from kdgen import prompts
    from kdgen.corpus import dataset, jobfile
    from kdgen.records import writer
    from kdgen.worker import preflight

    c = config_mod.from_sources({"model_path": "-", "output_path": "-", **job_flags(args)})
    preflight.check_locations(c)
    pinned = jobfile.pinned_plan(c.output_path) if c.output_path != "-" else None
    p = pinned or dataset.plan(c.dataset_path, c.chunk_size, c.seed, columns=prompts.input_columns(c), limit=c.limit)
    print(f"plan{' (pinned in the job file)' if pinned else ''}: {p.summary()}")
    for f in p.files:
        print(f"  {f.url}: {f.num_rows} rows")
    if c.output_path != "-":
        done = writer.finished_chunk_names(c.output_path)
        n_done = sum(ch.name in done for ch in p.chunks)
        print(f"done: {n_done}/{len(p.chunks)} chunks in {c.output_path}")
    order = dataset.host_order(p.chunks, c.host_index, c.num_hosts)
    print(f"host {c.host_index}/{c.num_hosts} starts at: " + ", ".join(ch.name for ch in order[:3]))

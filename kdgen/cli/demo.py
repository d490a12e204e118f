"""`kdgen demo`: a small corpus and a tiny Llama fitted to it, the real job on them, two records."""

from __future__ import annotations

import json
import logging
import os

from kdgen import config as config_mod
from kdgen import logs
from kdgen.cli.job_flags import add_job_flags, job_flags

log = logging.getLogger("kdgen")

HELP = ("make a small parquet corpus and a tiny Llama fitted to it, run the real job on them (vLLM on the "
        "CPU), and show two records. Run it again: every chunk is done, nothing is redone")
DEMO_FLAGS = ("model_path", "dataset_path", "output_path")


def register(commands) -> None:
    p = commands.add_parser("demo", help="run the real job on a made-up corpus and tiny model",
                            description=HELP[0].upper() + HELP[1:] + ".")
    p.add_argument("--workdir", default="kdgen_demo", help="where the corpus, model and output go")
    p.add_argument("--rows_per_file", "--rows-per-file", type=int, default=100)
    p.add_argument("--num_files", "--num-files", type=int, default=3)
    add_job_flags(p, skip=DEMO_FLAGS)
    p.set_defaults(func=lambda args: demo(args.workdir, args.rows_per_file, args.num_files,
                                          **job_flags(args, skip=DEMO_FLAGS)))


def demo(workdir: str = "kdgen_demo", rows_per_file: int = 100, num_files: int = 3, **flags):
    """Make a small parquet corpus and a tiny Llama fitted to it, run the real job on them (vLLM on
    the CPU), and show two records. Run it again: every chunk is done, nothing is redone."""
    import time

    from kdgen.worker import runner
    from kdgen.views import show as show_mod

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    logs.quiet_cpu_demo()
    workdir = os.path.abspath(workdir)
    model, data, out = (os.path.join(workdir, d) for d in ("model", "data", "out"))
    prepare_demo(workdir, num_files, rows_per_file)
    settings = dict(
        model_path=model, dataset_path=data, output_path=out,
        dtype="float32", max_model_len=512, enforce_eager=True, max_prefill_length=64,
        max_target_length=128, chunk_size=50, gen_batch_size=256, temperature=0.8,
    )
    settings.update(flags)
    c = config_mod.from_sources(settings, env={})
    log.info("running the job: %s rows of %s -> %s (vLLM on the CPU; its start takes a minute)",
             num_files * rows_per_file, short_path(data), short_path(out))
    t0 = time.time()
    runner.run(c)  # logs its summary line
    out = short_path(out)
    print(f"output: {out} (the job took {time.time() - t0:.0f} s); two of its records:\n")
    show_mod.show(out, n=2)
    again = "kdgen demo" + (f" --workdir {short_path(workdir)}" if workdir != os.path.abspath("kdgen_demo") else "")
    print("\nnext:\n" + "\n".join(f"  {cmd:<{len(out) + 24}} {what}" for cmd, what in (
        (f"kdgen show {out} --n 10", "more records (--row shard-00000.parquet:7: one input row)"),
        (f"kdgen status {out}", "chunks done / leased / pending, per-host rates (--watch)"),
        (f"kdgen audit {out}", "every row exactly once?"),
        (again, "again: resumes, every chunk is done, nothing is redone"))))


DEMO_MARKER = ".kdgen_demo.json"


def short_path(path: str) -> str:
    """Relative to the current directory when inside it (what the user typed), else as is."""
    return os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path


def prepare_demo(workdir: str, num_files: int, rows_per_file: int) -> None:
    """The demo's corpus and fitted model in workdir, made unless already there for these sizes.
    Remakes (and drops old output) only in a workdir this command made; never deletes others'."""
    import shutil

    from kdgen import tiny

    if num_files < 1 or rows_per_file < 1:
        raise ValueError(f"--num_files and --rows_per_file must be >= 1, got {num_files} and {rows_per_file}")
    want = {"num_files": num_files, "rows_per_file": rows_per_file}
    marker = os.path.join(workdir, DEMO_MARKER)
    try:
        with open(marker) as f:
            made = json.load(f)
    except (OSError, ValueError):
        made = None
    parts = [os.path.join(workdir, d) for d in ("model", "data", "out")]
    if made == want and all(os.path.isdir(d) for d in parts[:2]):
        return
    for d in parts:
        if os.path.exists(d):
            if made is None:
                raise ValueError(f"{d} exists but was not made by this version of `kdgen demo`: "
                                 f"move it away, or pass another --workdir")
            shutil.rmtree(d)
    model, data = parts[:2]
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w") as f:  # first: a failure below leaves a workdir the next run may clean
        json.dump({}, f)
    tiny.make_corpus(data, num_files=num_files, rows_per_file=rows_per_file)
    info = tiny.make_demo_model(model, tiny.corpus_texts(data))
    with open(marker, "w") as f:
        json.dump(want, f)
    log.info("made %s: %d parquet files x %d rows of random words", short_path(data), num_files, rows_per_file)
    log.info("made %s: a tiny Llama fitted to that corpus in %.2f s (its word bigram, counted over %d tokens, "
             "set into the weights)", short_path(model), info["fit_seconds"], info["tokens_counted"])



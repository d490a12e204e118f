"""`kdgen` command line (fire): run | score | adopt | plan | status | audit | show | export | demo | flags.

Every `run`/`plan` flag is also read from its upper-case environment variable (`--chunk_size`
or `CHUNK_SIZE`); `kdgen flags` prints the table.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from kdgen import config as config_mod
from kdgen import logs, redact

log = logging.getLogger("kdgen")
logs.vllm_import_level()  # also runs in vLLM's spawned engine processes: see there


def run(**flags):
    """Generate completions for this host's share of the corpus (resumable, multi-host safe)."""
    from kdgen.worker import runner

    c = config_mod.from_sources(flags)
    log.info("settings:\n%s", config_mod.describe(c))
    if c.data_parallel_size > 1:
        from kdgen.worker.parallel import run_ranks

        code = run_ranks(c)
        if code:
            sys.exit(code)
        return None
    summary = runner.run(c)
    print(summary.line())
    return None


def score(**flags):
    """Score given texts (TEXT_COLUMN) or prompt/completion pairs (COMPLETION_COLUMN): the teacher's
    prompt logprobs (and top-LOGPROBS), written as resumable chunk objects like `run`."""
    from kdgen.worker import runner

    c = config_mod.from_sources({**flags, "task": "score"})
    log.info("settings:\n%s", config_mod.describe(c))
    summary = runner.run(c)
    print(summary.line())
    return None


def adopt(output_path: str, **flags):
    """Re-pin an output whose _job.json was lost: write a new one with these settings (the `run`
    flags and env vars; they must be the ones its chunk objects were made with) over the chunk
    objects it holds, recorded as adopted (time, host, number of chunks; `kdgen audit` reports it).
    A run over chunk objects without a _job.json is refused until then."""
    from kdgen.worker import runner
    from kdgen.prompts import input_columns

    c = config_mod.from_sources({**flags, "output_path": output_path})
    plan = runner.prepare(c, input_columns(c), adopt=True)
    print(f"adopted: {output_path} now pins {plan.summary()}; run the job to generate what is missing")


def plan(**flags):
    """Print the chunk plan (footers only) and, if OUTPUT_PATH exists, how much is done."""
    from kdgen import prompts
    from kdgen.corpus import dataset
    from kdgen.corpus import jobfile
    from kdgen.records import writer

    c = config_mod.from_sources({"model_path": "-", "output_path": "-", **flags})
    from kdgen.worker import preflight

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


def status(output_path: str, as_json: bool = False, watch: bool = False, every: float = 5.0, count: int = 0):
    """Chunks done / leased (by whom, until when) / pending, rows, tokens, per-host rates.

    --watch refreshes every --every seconds (on a terminal in place) until every chunk is done,
    or --count refreshes; it names the slowest working host."""
    from kdgen.views import status as status_mod

    if watch or count:
        if every <= 0:
            raise ValueError(f"--every must be > 0 seconds, got {every}")
        try:
            status_mod.watch(output_path, every=every, count=count, as_json=as_json)
        except KeyboardInterrupt:
            pass
        return
    report = status_mod.status(output_path)
    print(redact.redact(json.dumps(report, indent=2) if as_json else status_mod.format_status(report)))


def show(output_path: str, n: int = 3, chunk: str | None = None, row: str | None = None):
    """Print records (prompt, completion, finish reason, token counts, logprob summary) and error
    rows of an output, local or gs://. --chunk NAME: one chunk object; --row FILE:ROW: one input row."""
    from kdgen.views import show as show_mod

    show_mod.show(output_path, n=n, chunk=chunk, row=row)


def audit(output_path: str, dataset_path: str = "", repair: bool = False):
    """Check that every input row is covered exactly once per sample and every chunk object is
    whole (its content hash) and holds only its own rows; exit 1 on gaps, duplicates or bad objects.

    --repair moves the bad chunk objects aside to OUT/_bad/ (with the reason), so that the next
    run of the job generates those chunks again."""
    from kdgen.views import status as status_mod

    report = status_mod.audit(output_path, dataset_path or None)
    print(redact.redact(status_mod.format_audit(report)))
    if repair and report["bad_objects"]:
        moved = status_mod.repair(output_path, report)
        print(f"repair: moved {len(moved)} bad chunk objects to {status_mod.BAD_DIR}/ in {output_path}; "
              f"run the job again to generate them")
    if not report["ok"]:
        sys.exit(1)


def export(output_path: str, to: str = "", dest: str = "", shard_mb: float = 256.0, allow_partial: bool = False,
           file_format: str = "jsonl", dataset_path: str = ""):
    """Export a job's committed chunk objects as trainer-ready shards in DEST (local or gs://):
    --to maxtext-offline (ArrayRecord for MaxText offline distillation) or distillkit (DistillKit's
    top-k parquet), both from a `kdgen score --logprobs K` job or a generation job run with
    --logprobs K --prompt_logprobs; axolotl-kd (Axolotl's tokenized KD rows, from a generation job run
    with --logprobs K); messages (chat jobs: role/content plus TRL's prompt/completion),
    text (prefix-mode jobs: text, prompt, completion), both --file_format jsonl|parquet; or parquet
    (compacted records). See docs/outputs.md.
    --shard_mb: about that many MB of chunk objects per shard. A job with missing chunks is refused
    unless --allow_partial. Resumable and idempotent: a rerun writes only missing shards."""
    from kdgen.export.shards import shards as export_mod

    if not to or not dest:
        raise ValueError("kdgen export OUT --to maxtext-offline|distillkit|axolotl-kd|messages|text|parquet --dest DIR")
    summary = export_mod.export(output_path, to, dest, shard_mb=shard_mb, allow_partial=allow_partial,
                                file_format=file_format, dataset_path=dataset_path or None)
    print(summary.line(dest))


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


def flags():
    """Print every run flag with its env var, default and meaning (the README table)."""
    print(config_mod.flag_table())


run.__doc__ += "\n\nFlags (each also read from its upper-case env var):\n" + "\n".join(
    f"  --{f.name} ({f.name.upper()}, default {f.default!r}): {f.metadata['help']}"
    for f in config_mod.fields(config_mod.JobConfig))

COMMANDS = {"run": run, "score": score, "adopt": adopt, "plan": plan, "status": status, "audit": audit, "show": show,
            "export": export,
            "demo": demo, "flags": flags}


# Commands that start no engine and no child process. As the process's own entry point they end
# with os._exit once their output is flushed: pyarrow's thread pools (and gcsfs's grpc import) can
# abort the interpreter's teardown ("terminate called without an active exception", exit 134;
# apache/arrow #34314) after all the work was done, and an audit that passed must not exit 134.
HARD_EXIT_COMMANDS = ("adopt", "plan", "status", "audit", "show", "export", "flags")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is not None or not any(a in HARD_EXIT_COMMANDS for a in args[:2]):
        return _main(args)
    try:
        _main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, OSError):  # `kdgen show OUT | head` closed the pipe early
            code = code or 1
    os._exit(code or 0)


def _main(args: list[str]) -> None:
    import fire

    from kdgen.views.progress import end_live_lines

    try:  # --verbose is an option of every command, taken before fire sees the arguments
        verbose, args = logs.take_verbose(args)
    except ValueError as e:
        print(f"kdgen: error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(verbose=verbose)
    redacted_tracebacks()
    bad_input, stopped = user_errors()
    try:
        fire.Fire(COMMANDS, command=args, name="kdgen")
    except bad_input as e:
        if os.environ.get("KDGEN_DEBUG"):
            raise
        end_live_lines()
        print(f"kdgen: error: {redact.redact(str(e))}", file=sys.stderr)
        sys.exit(2)
    except stopped as e:
        if os.environ.get("KDGEN_DEBUG"):
            raise
        end_live_lines()
        print(f"kdgen: error: {redact.redact(str(e))}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `kdgen show OUT | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def redacted_tracebacks() -> None:
    """An unexpected exception's traceback is printed through redact() too."""
    import traceback

    def hook(kind, value, tb):
        sys.stderr.write(redact.redact("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = hook


def user_errors():
    """Errors whose message is the whole story (one line, no traceback): bad settings or input
    (exit 2: fix and rerun), and a job that stopped (exit 1: rerun the same command to resume)."""
    from kdgen.config import ConfigError
    from kdgen.corpus.dataset import DatasetError
    from kdgen.engines.base import EngineError
    from kdgen.worker.runner import JobError
    from kdgen.views.show import ShowError
    from kdgen.storage import StorageError
    from kdgen.records.writer import FingerprintMismatch

    return ((ConfigError, DatasetError, FingerprintMismatch, ShowError, FileNotFoundError, ValueError),
            (EngineError, JobError, StorageError))


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    main()

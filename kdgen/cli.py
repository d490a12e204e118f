"""`kdgen` command line (fire): run | score | plan | status | audit | demo | flags.

Every `run`/`plan` flag is also read from its upper-case environment variable (`--chunk_size`
or `CHUNK_SIZE`); `kdgen flags` prints the table.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from kdgen import config as config_mod

log = logging.getLogger("kdgen")


def rank_tag() -> str:
    rank = os.environ.get("KDGEN_DP_RANK")
    return f"[dp{rank}]" if rank else ""


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("KDGEN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s kdgen" + rank_tag() + ": %(message)s",
        datefmt="%H:%M:%S",
    )


def run(**flags):
    """Generate completions for this host's share of the corpus (resumable, multi-host safe)."""
    from kdgen import runner

    c = config_mod.from_sources(flags)
    log.info("settings:\n%s", config_mod.describe(c))
    if c.data_parallel_size > 1:
        from kdgen.parallel import run_ranks

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
    from kdgen import runner

    c = config_mod.from_sources({**flags, "task": "score"})
    log.info("settings:\n%s", config_mod.describe(c))
    summary = runner.run(c)
    print(summary.line())
    return None


def plan(**flags):
    """Print the chunk plan (footers only) and, if OUTPUT_PATH exists, how much is done."""
    from kdgen import dataset, prompts, writer

    from kdgen import jobfile

    c = config_mod.from_sources({"model_path": "-", "output_path": "-", **flags})
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


def status(output_path: str, as_json: bool = False):
    """Chunks done / leased (by whom, until when) / pending, rows, tokens, per-host rates."""
    from kdgen import status as status_mod

    report = status_mod.status(output_path)
    print(json.dumps(report, indent=2) if as_json else status_mod.format_status(report))


def audit(output_path: str, dataset_path: str = ""):
    """Check that every input row is covered exactly once per sample; exit 1 on gaps/duplicates."""
    from kdgen import status as status_mod

    report = status_mod.audit(output_path, dataset_path or None)
    print(status_mod.format_audit(report))
    if not report["ok"]:
        sys.exit(1)


def demo(workdir: str = "kdgen_demo", rows_per_file: int = 100, num_files: int = 3, **flags):
    """Make a tiny Llama + tokenizer and a small parquet corpus, then run the real job on them (CPU)."""
    from kdgen import runner, tiny

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    workdir = os.path.abspath(workdir)
    model = os.path.join(workdir, "model")
    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(model, "config.json")):
        log.info("making a tiny Llama in %s", model)
        tiny.make_model(model)
    if not os.path.isdir(data):
        tiny.make_corpus(data, num_files=num_files, rows_per_file=rows_per_file)
    settings = dict(
        model_path=model, dataset_path=data, output_path=os.path.join(workdir, "out"),
        dtype="float32", max_model_len=512, enforce_eager=True, max_prefill_length=64,
        max_target_length=128, chunk_size=50, gen_batch_size=256, temperature=0.8,
    )
    settings.update(flags)
    c = config_mod.from_sources(settings, env={})
    summary = runner.run(c)
    out = c.output_path
    names = sorted(n for n in os.listdir(out) if n.endswith(".jsonl"))
    print(summary.line())
    print(f"output: {out} ({len(names)} chunk files, e.g. {names[0] if names else '-'})")
    if names:
        with open(os.path.join(out, names[0])) as f:
            first = json.loads(f.readline())
        shown = {k: (v[:8] + ["..."] if isinstance(v, list) and len(v) > 8 else v) for k, v in first.items()}
        print("first record:", json.dumps(shown, ensure_ascii=False)[:800])


def flags():
    """Print every run flag with its env var, default and meaning (the README table)."""
    print(config_mod.flag_table())


run.__doc__ += "\n\nFlags (each also read from its upper-case env var):\n" + "\n".join(
    f"  --{f.name} ({f.name.upper()}, default {f.default!r}): {f.metadata['help']}"
    for f in config_mod.fields(config_mod.JobConfig))

COMMANDS = {"run": run, "score": score, "plan": plan, "status": status, "audit": audit, "demo": demo, "flags": flags}


def main(argv: list[str] | None = None) -> None:
    import fire

    setup_logging()
    bad_input, stopped = user_errors()
    try:
        fire.Fire(COMMANDS, command=argv, name="kdgen")
    except bad_input as e:
        if os.environ.get("KDGEN_DEBUG"):
            raise
        print(f"kdgen: error: {e}", file=sys.stderr)
        sys.exit(2)
    except stopped as e:
        if os.environ.get("KDGEN_DEBUG"):
            raise
        print(f"kdgen: error: {e}", file=sys.stderr)
        sys.exit(1)


def user_errors():
    """Errors whose message is the whole story (one line, no traceback): bad settings or input
    (exit 2: fix and rerun), and a job that stopped (exit 1: rerun the same command to resume)."""
    from kdgen.config import ConfigError
    from kdgen.dataset import DatasetError
    from kdgen.engine import EngineError
    from kdgen.runner import JobError
    from kdgen.storage import StorageError
    from kdgen.writer import FingerprintMismatch

    return ((ConfigError, DatasetError, FingerprintMismatch, FileNotFoundError, ValueError),
            (EngineError, JobError, StorageError))


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    main()

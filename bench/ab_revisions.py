"""Two kdgen revisions side by side in one run: the front-end's CPU per generated token of the same
job, rounds interleaved.

    PYTHONPATH=. .venv/bin/python bench/ab_revisions.py BEFORE [AFTER] [--rounds 6] [--rows 1024]
        [--k 20] [--format parquet]

BEFORE and AFTER are git revisions (AFTER: the working tree as it is). Each is checked out into a
temporary git worktree and runs in a child process of its own, with its own in-process vLLM engine
(the tiny Llama made on the spot, greedy, the same settings). The parent tells the children in
turn to run the same whole job (runner.run: reading rows, prompts, engine, records, commits) and
alternates who goes first in each round, so that the box's drift falls on both. Per run: the CPU
time of the child's main thread and of its whole process (vLLM's output thread, the commit thread,
...) while the job ran, per generated token, and tokens/s. Medians over rounds. The engine processes'
own CPU is not counted: that is vLLM's work, the same for both.

This measures a change's effect directly; bench/frontend.py measures kdgen against raw vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    """Runs in a revision's checkout: start the engine, then one job per "run" line on stdin."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from kdgen import config as config_mod, prompts
    from kdgen.engines.vllm_engine import VllmEngine
    from kdgen.worker import runner

    def job(out: str, limit: int = 0):
        return config_mod.from_sources(dict(
            model_path=args.model, dataset_path=args.data, output_path=out, temperature=0.0, logprobs=args.k,
            output_file_format=args.format, max_prefill_length=32, max_target_length=96, chunk_size=128,
            log_every_s=1e9, limit=limit, dtype="float32", max_model_len=512, enforce_eager=True), env={})

    work = tempfile.mkdtemp(prefix="kdgen-ab-")
    engine = VllmEngine(job(os.path.join(work, "unused")))
    tok = prompts.load_tokenizer(args.model)
    runner.run(job(os.path.join(work, "warm"), limit=64), engine=engine, tokenizer=tok)  # first-time costs
    print(json.dumps({"ready": True}), flush=True)
    for n, line in enumerate(sys.stdin):
        if line.strip() != "run":
            break
        out = os.path.join(work, f"run{n}")
        t0, c0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        tokens = runner.run(job(out), engine=engine, tokenizer=tok).generated_tokens
        main, proc, wall = time.thread_time() - t0, time.process_time() - c0, time.perf_counter() - w0
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({"tokens": tokens, "main_us": main / tokens * 1e6, "process_us": proc / tokens * 1e6,
                          "tok_s": tokens / wall}), flush=True)
    engine.close()
    shutil.rmtree(work, ignore_errors=True)


def checkout(rev: str | None, into: str) -> str:
    """A directory holding kdgen at rev (None: this working tree)."""
    if rev is None:
        return REPO
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "--quiet", into, rev], check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", nargs="?", help="required, but for the children this script starts")
    ap.add_argument("after", nargs="?", default=None, help="default: the working tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.before is None:
        ap.error("BEFORE: a git revision is required")

    from kdgen import tiny

    work = tempfile.mkdtemp(prefix="kdgen-ab-revs-")
    model = tiny.make_model(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    tiny.make_corpus(data, num_files=4, rows_per_file=args.rows // 4, seed=1)
    sides = {"before": args.before, "after": args.after or "working tree"}
    trees, kids = {}, {}
    try:
        for side, rev in (("before", args.before), ("after", args.after)):
            trees[side] = checkout(rev, os.path.join(work, side))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--data", data,
                   "--k", str(args.k), "--format", args.format]
            kids[side] = subprocess.Popen(cmd, cwd=trees[side], env={**os.environ, "PYTHONPATH": trees[side]},
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def result(side: str) -> dict:
            for line in kids[side].stdout:
                if line.startswith("{"):
                    return json.loads(line)
            raise SystemExit(f"the {side} child ended early (exit {kids[side].wait()})")

        for side in kids:
            assert result(side)["ready"]
        runs: dict[str, list[dict]] = {side: [] for side in kids}
        for r in range(args.rounds):
            for side in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
                kids[side].stdin.write("run\n")
                kids[side].stdin.flush()
                runs[side].append(result(side))
                got = runs[side][-1]
                print(f"round {r} {side:6s}: main {got['main_us']:.2f}, process {got['process_us']:.2f} us/token, "
                      f"{got['tok_s']:.0f} tok/s", flush=True)
        tokens = {side: {x["tokens"] for x in v} for side, v in runs.items()}
        assert len(set().union(*tokens.values())) == 1, f"the revisions generated different token counts: {tokens}"
    finally:
        for kid in kids.values():
            if kid.poll() is None:
                kid.stdin.close()
                kid.wait()
        for side, tree in trees.items():
            if tree != REPO:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nk={args.k} {args.format}, {args.rows} rows, {next(iter(tokens['before']))} generated tokens a run, "
          f"medians of {args.rounds} interleaved rounds\n")
    print("| revision | main thread us/token | process us/token | tok/s |")
    print("|---|---|---|---|")
    med = {side: {key: statistics.median(x[key] for x in v) for key in ("main_us", "process_us", "tok_s")}
           for side, v in runs.items()}
    for side in ("before", "after"):
        m = med[side]
        print(f"| {sides[side]} | {m['main_us']:.2f} | {m['process_us']:.2f} | {m['tok_s']:.0f} |")
    print(f"| after / before | {med['after']['main_us'] / med['before']['main_us']:.3f} | "
          f"{med['after']['process_us'] / med['before']['process_us']:.3f} | "
          f"{med['after']['tok_s'] / med['before']['tok_s']:.3f} |")


if __name__ == "__main__":
    main()

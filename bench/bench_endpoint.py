"""kdgen through an OpenAI-compatible endpoint vs kdgen with the in-process engine: the same job.

    .venv/bin/python bench/bench_endpoint.py [--rows 512] [--rounds 2] [--concurrency 64]

Both sides run the whole job (plan, read parquet, tokenize, generate, write chunk objects) on the
same corpus with greedy sampling, so they generate the same tokens (checked). Phase 1 starts
the in-process vLLM engine, warms it up and times --rounds jobs; it is shut down, then phase 2
starts `vllm serve` of the same model (same engine flags) on 127.0.0.1, warms it up and times
--rounds jobs with --endpoint. One engine at a time, so each has the whole machine. Printed:
generated tokens/s of each side (median of rounds) and endpoint / in-process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def read_tokens(out: str) -> dict:
    toks = {}
    for path in glob.glob(os.path.join(out, "*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            toks[(r["parquet_file"], r["row_idx"])] = r["completion_token_ids"]
    return toks


def start_server(model: str, port: int, log_path: str, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log_path}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server not healthy; see {log_path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--target", type=int, default=96, help="max_target_length: up to ~64 generated tokens")
    ap.add_argument("--chunk_size", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--gen_batch_size", type=int, default=256)
    ap.add_argument("--model", default="", help="HF model dir; default: a tiny Llama made on the spot")
    args = ap.parse_args()

    from kdgen import config as config_mod, tiny
    from kdgen.worker import runner
    from kdgen.engines.vllm_engine import VllmEngine

    work = tempfile.mkdtemp(prefix="kdgen-bench-ep-")
    model = args.model or tiny.make_model(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    tiny.make_corpus(data, num_files=args.files, rows_per_file=args.rows // args.files, seed=1)

    def job(out: str, **kw):
        return config_mod.from_sources(dict(
            model_path=model, dataset_path=data, output_path=out, temperature=0.0, dtype="float32",
            max_model_len=512, enforce_eager=True, max_prefill_length=args.prefill,
            max_target_length=args.target, chunk_size=args.chunk_size, gen_batch_size=args.gen_batch_size,
            concurrency=args.concurrency, log_every_s=1e9, **kw), env={})

    def timed(c, engine=None):
        shutil.rmtree(c.output_path, ignore_errors=True)
        s = runner.run(c, engine=engine)
        return s.generated_tokens / s.elapsed_s, s

    results = {}
    # Phase 1: in-process.
    eng = VllmEngine(job(os.path.join(work, "unused")))
    timed(job(os.path.join(work, "warm-local"), limit=64), eng)
    rates = [timed(job(os.path.join(work, "local")), eng) for _ in range(args.rounds)]
    results["in_process"] = rates
    local_tokens = read_tokens(os.path.join(work, "local"))
    eng.close()
    del eng

    # Phase 2: endpoint.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    proc = start_server(model, port, os.path.join(work, "server.log"), args)
    print(f"server ready in {time.time() - t0:.1f} s")
    try:
        url = f"http://127.0.0.1:{port}/v1"
        timed(job(os.path.join(work, "warm-ep"), limit=64, endpoint=url))
        rates = [timed(job(os.path.join(work, "ep"), endpoint=url)) for _ in range(args.rounds)]
        results["endpoint"] = rates
        ep_tokens = read_tokens(os.path.join(work, "ep"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    same = ep_tokens == local_tokens
    med = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    s = results["in_process"][0][1]
    print(f"job: {s.rows} rows x <= {args.prefill} prompt tokens, {s.generated_tokens} generated tokens per round, "
          f"greedy, concurrency {args.concurrency}, gen_batch_size {args.gen_batch_size}, rounds {args.rounds}")
    for k, v in results.items():
        print(f"{k:>10}: " + ", ".join(f"{r:.0f}" for r, _ in v) + f" tok/s (median {med[k]:.0f}; "
              f"{statistics.median(x.elapsed_s for _, x in v):.2f} s per job)")
    print(f"endpoint / in-process = {med['endpoint'] / med['in_process']:.2f}; same tokens: {same}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Logit KD output: bytes per generated token (JSONL vs parquet) and job throughput vs raw
`LLM.generate(..., logprobs=k)` on the same prompts, for k = 0, 5, 20; one process, one engine.

    .venv/bin/python bench/logit_kd.py [--rows 512] [--rounds 3] [--ks 0,5,20] [--vocab_ids 0]

Per round and k (rounds interleave every variant, to spread machine noise):
  raw        LLM.generate(prompts, SamplingParams(temperature=0, logprobs=k)): vLLM's defaults
             (per-position dicts, every logprob token decoded to text);
  raw-lean   the same with flat_logprobs=True, detokenize=False (the cheapest raw vLLM can do;
             kdgen's own settings for k > 0), text not decoded at all;
  kdgen-X    the whole job (footers, parquet reads, tokenizing, streaming pool, leases, commit)
             with OUTPUT_FILE_FORMAT=X, timed end to end.
Bytes per token: the chunk objects' bytes / generated tokens. Greedy, so every variant generates
the same tokens (checked). --vocab_ids N re-encodes one job's top-k ids as random ids < N (a
real vocabulary's ids compress worse than the tiny model's ~500) to show parquet bytes then.

--bytes_only skips the throughput rounds: per k, one kdgen job in each format (end to end on the
real engine, every position checked to hold k top-k entries; kdgen raises vLLM's max_logprobs to
k), then bytes per token as stored and with real-vocabulary ids (--vocab_ids), e.g. for k = 64,
128: `--bytes_only --ks 64,128`. The tiny random model's top-k logprobs are nearly flat (its
vocabulary is 512 tokens), which flatters float16 compression; --redraw_logprobs also re-draws
them from a model of a real teacher's tail (`model_logprobs`) to show the cost then.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ks", default="0,5,20")
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--target", type=int, default=96, help="max_target_length: ~64 generated tokens")
    ap.add_argument("--chunk_size", type=int, default=128)
    ap.add_argument("--vocab_ids", type=int, default=128256)
    ap.add_argument("--model", default="", help="HF model dir; default: a tiny Llama made on the spot")
    ap.add_argument("--engine_args", default="dtype=float32,max_model_len=512,enforce_eager=true")
    ap.add_argument("--bytes_only", action="store_true", help="per k: one job per format and bytes per token")
    ap.add_argument("--redraw_logprobs", action="store_true", help="with --bytes_only: also re-draw the logprobs")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    from vllm import SamplingParams

    from kdgen import config as config_mod, prompts, tiny
    from kdgen.corpus import dataset
    from kdgen.worker import runner
    from kdgen.records import naming
    from kdgen.engines.vllm_engine import VllmEngine

    work = tempfile.mkdtemp(prefix="kdgen-bench-lkd-")
    model = args.model or tiny.make_model(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    tiny.make_corpus(data, num_files=args.files, rows_per_file=args.rows // args.files, seed=1)
    engine_flags = dict(kv.split("=", 1) for kv in args.engine_args.split(",") if kv)

    def job(out: str, k: int, fmt: str):
        return config_mod.from_sources(dict(
            model_path=model, dataset_path=data, output_path=out, temperature=0.0, logprobs=k,
            output_file_format=fmt, max_prefill_length=args.prefill, max_target_length=args.target,
            chunk_size=args.chunk_size, log_every_s=1e9, **engine_flags), env={})

    c0 = job(os.path.join(work, "unused"), max(ks), "jsonl")
    eng = VllmEngine(c0)  # max_logprobs >= max(ks)
    tok = prompts.load_tokenizer(model)
    builder = prompts.PromptBuilder(c0, tok, eng.max_model_len)
    plan = dataset.plan(data, c0.chunk_size, c0.seed, columns=builder.columns())
    raw_prompts, budgets = [], []
    for ch in plan.chunks:
        for p in builder.build(dataset.read_chunk(ch, ["text"]).column("text").to_pylist(), ch.start):
            raw_prompts.append({"prompt_token_ids": p.token_ids})
            budgets.append(p.max_tokens)

    if args.bytes_only:
        bytes_per_token(args, ks, work, eng, tok, job)
        eng.close()
        shutil.rmtree(work, ignore_errors=True)
        return

    def run_raw(k: int, lean: bool) -> tuple[float, int]:
        extra = {"logprobs": k} if k else {}
        if lean and k:
            extra.update(flat_logprobs=True, detokenize=False)
        params = [SamplingParams(temperature=0.0, max_tokens=b, **extra) for b in budgets]
        t = time.perf_counter()
        outs = eng.llm.generate(raw_prompts, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    sizes: dict[tuple[int, str], float] = {}

    def run_kdgen(k: int, fmt: str, i: int) -> tuple[float, int]:
        out = os.path.join(work, f"out-{k}-{fmt}-{i}")
        t = time.perf_counter()
        s = runner.run(job(out, k, fmt), engine=eng, tokenizer=tok)
        dt = time.perf_counter() - t
        nbytes = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if naming.parse_object_name(n))
        sizes[(k, fmt)] = nbytes / s.generated_tokens
        if k == max(ks) and fmt == "jsonl" and i == 0 and args.vocab_ids:  # full-precision logprobs
            jb, pb = real_vocab_bytes(out, args.vocab_ids)
            sizes[("real-vocab-jsonl", k)], sizes[("real-vocab-parquet", k)] = jb / s.generated_tokens, pb / s.generated_tokens
        shutil.rmtree(out)
        return dt, s.generated_tokens

    eng.llm.generate(raw_prompts[:64], [SamplingParams(max_tokens=8)] * 64, use_tqdm=False)  # warm-up
    variants = [("raw", lambda k, i: run_raw(k, False)), ("raw-lean", lambda k, i: run_raw(k, True)),
                ("kdgen-jsonl", lambda k, i: run_kdgen(k, "jsonl", i)),
                ("kdgen-parquet", lambda k, i: run_kdgen(k, "parquet", i))]
    times: dict[tuple[int, str], list[float]] = {}
    tokens = None
    for i in range(args.rounds):
        for k in ks:
            for name, fn in variants:
                if name == "raw-lean" and k == 0:
                    continue
                dt, n = fn(k, i)
                tokens = tokens or n
                assert n == tokens, f"token counts differ: {name} k={k}: {n} vs {tokens}"
                times.setdefault((k, name), []).append(dt)
                print(f"round {i} k={k:2d} {name:14s} {dt:6.2f} s {n / dt:8.0f} tok/s", flush=True)
    eng.close()
    shutil.rmtree(work, ignore_errors=True)

    print(f"\n{len(raw_prompts)} prompts, {tokens} generated tokens per run, {args.rounds} rounds (medians)\n")
    print("| k | raw tok/s | raw-lean tok/s | kdgen jsonl tok/s | kdgen parquet tok/s | jsonl / raw | parquet / raw "
          "| parquet / raw-lean | JSONL B/token | parquet B/token | parquet / JSONL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        rate = {n: tokens / statistics.median(v) for (kk, n), v in times.items() if kk == k}
        raw, lean, kj, kp = rate["raw"], rate.get("raw-lean"), rate["kdgen-jsonl"], rate["kdgen-parquet"]
        bj, bp = sizes[(k, "jsonl")], sizes[(k, "parquet")]
        lean_s, vs_lean = (f"{lean:.0f}", f"{kp / lean:.3f}") if lean else ("-", "-")
        print(f"| {k} | {raw:.0f} | {lean_s} | {kj:.0f} | {kp:.0f} | {kj / raw:.3f} | {kp / raw:.3f} | {vs_lean} "
              f"| {bj:.1f} | {bp:.1f} | {bp / bj:.3f} |")
    if ("real-vocab-parquet", max(ks)) in sizes:
        k = max(ks)
        jb, pb = sizes[("real-vocab-jsonl", k)], sizes[("real-vocab-parquet", k)]
        print(f"\nk={k}, every token id re-drawn uniformly below {args.vocab_ids} (a real vocabulary; uniform ids are "
              f"the worst case for compression): JSONL {jb:.1f} B/token, parquet {pb:.1f} B/token, parquet / JSONL "
              f"{pb / jb:.3f}")
    print(json.dumps({"tokens": tokens, "medians_s": {f"{k}/{n}": statistics.median(v) for (k, n), v in times.items()},
                      "bytes_per_token": {f"{a}/{b}": v for (a, b), v in sizes.items()}}))


def bytes_per_token(args, ks: list[int], work: str, eng, tok, job) -> None:
    """--bytes_only: per k, a JSONL and a parquet job end to end, their bytes per generated token,
    and the same records re-encoded with real-vocabulary ids (and re-drawn logprobs)."""
    from kdgen.worker import runner
    from kdgen.records import chunk_object, naming

    rows = []
    for k in ks:
        fig, kept = {"k": k}, None
        for fmt in ("jsonl", "parquet"):
            out = os.path.join(work, f"bytes-{k}-{fmt}")
            s = runner.run(job(out, k, fmt), engine=eng, tokenizer=tok)
            names = [n for n in os.listdir(out) if naming.parse_object_name(n)]
            for n in names:
                records, errors = chunk_object.read_chunk_object(os.path.join(out, n))
                assert not errors, errors[:1]
                widths = {len(ids) for r in records for ids in r.get("top_token_ids") or []}
                assert widths <= {k}, f"k={k} {fmt}: top-k widths {widths}"
            fig[f"{fmt} B/token"] = sum(os.path.getsize(os.path.join(out, n)) for n in names) / s.generated_tokens
            fig["tokens"] = s.generated_tokens
            if fmt == "jsonl":
                kept = out
            else:
                shutil.rmtree(out)
        if k and args.vocab_ids:
            jb, pb = real_vocab_bytes(kept, args.vocab_ids)
            fig["real-vocab jsonl"], fig["real-vocab parquet"] = jb / fig["tokens"], pb / fig["tokens"]
            if args.redraw_logprobs:
                jb, pb = real_vocab_bytes(kept, args.vocab_ids, redraw_logprobs=True)
                fig["redrawn jsonl"], fig["redrawn parquet"] = jb / fig["tokens"], pb / fig["tokens"]
        shutil.rmtree(kept)
        rows.append(fig)
        print(json.dumps(fig), flush=True)
    keys = [key for key in rows[-1] if key not in ("k", "tokens")]
    print(f"\nbytes per generated token (ids re-drawn uniformly below {args.vocab_ids} in the real-vocab "
          f"columns{'; redrawn: logprobs too, see model_logprobs' if args.redraw_logprobs else ''})\n")
    print("| k | tokens | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for fig in rows:
        print(f"| {fig['k']} | {fig['tokens']} | " + " | ".join(
            f"{fig[key]:.1f}" if key in fig else "-" for key in keys) + " |")


def model_logprobs(rng, k: int, vocab: int) -> list[float]:
    """A top-k of logprobs shaped like a real teacher's, without a 128k-wide softmax. The top-1
    token has probability q ~ Beta(0.5, 0.3) (mostly confident, sometimes flat); the other 1 - q
    spreads over the vocabulary as softmax(beta * g) over i.i.d. Gumbel draws g, whose top
    values are log(vocab) - log(S_j) (S_j: partial sums of i.i.d. Exp(1)) with log-partition
    log(vocab * Gamma(1 - beta)), beta ~ U(0.3, 0.95). A model, not a teacher: it only stands
    in for the spread of values that float16 then has to store."""
    import math

    q = min(max(rng.betavariate(0.5, 0.3), 1e-6), 1 - 1e-6)
    beta = rng.uniform(0.3, 0.95)
    log_rest = math.log1p(-q) - math.log(vocab) - math.lgamma(1 - beta)
    out, s = [math.log(q)], 0.0
    for _ in range(k - 1):
        s += rng.expovariate(1.0)
        out.append(log_rest + beta * (math.log(vocab) - math.log(s)))
    return sorted(out, reverse=True)


def real_vocab_bytes(out: str, vocab: int, redraw_logprobs: bool = False) -> tuple[int, int]:
    """(JSONL bytes, parquet bytes) of `out`'s records with every token id replaced by a random id < vocab
    (and, with redraw_logprobs, every position's top-k logprobs by `model_logprobs`)."""
    from kdgen.records import parquet_codec
    from kdgen.records import chunk_object, naming

    rng = random.Random(0)
    total_j = total_p = 0
    for n in os.listdir(out):
        if not naming.parse_object_name(n):
            continue
        records, errors = chunk_object.read_chunk_object(os.path.join(out, n))
        for r in records:
            r["top_token_ids"] = [[rng.randrange(vocab) for _ in row] for row in r["top_token_ids"]]
            r["completion_token_ids"] = [rng.randrange(vocab) for _ in r["completion_token_ids"]]
            r["prompt_token_ids"] = [rng.randrange(vocab) for _ in r["prompt_token_ids"]]
            if redraw_logprobs:
                r["top_logprobs"] = [model_logprobs(rng, len(row), vocab) for row in r["top_logprobs"]]
                r["token_logprobs"] = [row[0] if row else None for row in r["top_logprobs"]]  # greedy: top-1
        total_j += len(chunk_object.encode_jsonl(records))
        total_p += len(parquet_codec.encode_parquet(records))
    return total_j, total_p


if __name__ == "__main__":
    main()

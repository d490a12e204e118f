"""kdgen end to end vs raw `vllm.LLM.generate` on the same prompts, in one process, one engine.

    .venv/bin/python bench/throughput.py [--rows 1024] [--rounds 3] [--model DIR]

Both sides use the same engine and greedy sampling, so they generate the same tokens. The raw
side gets the prompt token ids kdgen would send (already tokenized: a head start); kdgen's
side is the whole job: plan footers, read parquet, tokenize, stream through the engine, write
JSONL chunk objects. Rounds alternate raw/kdgen to spread machine noise over both; the
printed ratio is kdgen throughput / raw throughput (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--target", type=int, default=96, help="max_target_length: ~64 generated tokens")
    ap.add_argument("--chunk_size", type=int, default=128)
    ap.add_argument("--model", default="", help="HF model dir; default: a tiny Llama made on the spot")
    ap.add_argument("--engine_args", default="dtype=float32,max_model_len=512,enforce_eager=true",
                    help="comma-separated kdgen engine flags")
    args = ap.parse_args()

    from vllm import SamplingParams

    from kdgen import config as config_mod, prompts, tiny
    from kdgen.corpus import dataset
    from kdgen.worker import runner
    from kdgen.engines.vllm_engine import VllmEngine

    work = tempfile.mkdtemp(prefix="kdgen-bench-")
    model = args.model or tiny.make_model(os.path.join(work, "model"))
    data = os.path.join(work, "data")
    tiny.make_corpus(data, num_files=args.files, rows_per_file=args.rows // args.files, seed=1)
    engine_flags = dict(kv.split("=", 1) for kv in args.engine_args.split(",") if kv)

    def job(out: str):
        return config_mod.from_sources(dict(
            model_path=model, dataset_path=data, output_path=out, temperature=0.0,
            max_prefill_length=args.prefill, max_target_length=args.target, chunk_size=args.chunk_size,
            log_every_s=1e9, **engine_flags), env={})

    c0 = job(os.path.join(work, "unused"))
    eng = VllmEngine(c0)
    tok = prompts.load_tokenizer(model)
    builder = prompts.PromptBuilder(c0, tok, eng.max_model_len)
    plan = dataset.plan(data, c0.chunk_size, c0.seed, columns=builder.columns())
    raw_prompts, raw_params = [], []
    for ch in plan.chunks:
        for p in builder.build(dataset.read_chunk(ch, ["text"]).column("text").to_pylist(), ch.start):
            raw_prompts.append({"prompt_token_ids": p.token_ids})
            raw_params.append(SamplingParams(temperature=0.0, max_tokens=p.max_tokens))
    n_prompts = len(raw_prompts)

    def run_raw() -> tuple[float, int]:
        t = time.perf_counter()
        outs = eng.llm.generate(raw_prompts, raw_params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    def run_kdgen(i: int) -> tuple[float, int]:
        out = os.path.join(work, f"out{i}")
        t = time.perf_counter()
        s = runner.run(job(out), engine=eng, tokenizer=tok)
        dt = time.perf_counter() - t
        shutil.rmtree(out)
        return dt, s.generated_tokens

    eng.llm.generate(raw_prompts[:64], raw_params[:64], use_tqdm=False)  # warm-up
    ratios, raw_rates, kd_rates = [], [], []
    for i in range(args.rounds):
        t_raw, tok_raw = run_raw()
        t_kd, tok_kd = run_kdgen(i)
        assert tok_raw == tok_kd, f"token counts differ: raw {tok_raw}, kdgen {tok_kd}"
        raw_rates.append(tok_raw / t_raw)
        kd_rates.append(tok_kd / t_kd)
        ratios.append(kd_rates[-1] / raw_rates[-1])
        print(f"round {i}: raw {t_raw:.2f}s {raw_rates[-1]:.0f} tok/s | kdgen {t_kd:.2f}s "
              f"{kd_rates[-1]:.0f} tok/s | ratio {ratios[-1]:.3f}", flush=True)
    eng.close()
    shutil.rmtree(work, ignore_errors=True)
    print(f"prompts {n_prompts}, generated tokens per run {tok_raw}")
    print(f"throughput ratio kdgen/raw: median {statistics.median(ratios):.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()

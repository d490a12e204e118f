"""Check a HF model dir (a converted MaxText Llama or Qwen3 checkpoint) before it serves as a teacher.

    kdgen-convert verify --model-path DIR [--probe-text FILE] [--reference CKPT [--query-scale fold|none]
                    [--rope-scaling llama3|none] [--rope-layout interleaved|half]] [--vllm] [--tolerance X]

(`python scripts/data_generation/verify_model.py` takes the same flags.) One line per check:
`PASS name: detail`, `FAIL name: detail`, `SKIP name: reason` or `INCONCLUSIVE name: detail` (a
check that ran and cannot decide), then a summary line. Exit status 1 when a check failed, 3 when
none failed but one was inconclusive, 0 when every check ran and passed.
The checks live in verify_files (the files) and verify_forward (running the model).
"""

from __future__ import annotations

import argparse
import os

from converters.verify_files import (INCONCLUSIVE, Report, check_config, check_files, check_generation_config,
                                     check_tokenizer)
from converters.verify_forward import (check_conventions, check_language, check_reference, check_transformers,
                                       check_vllm, converted_with, load_reference)

EXIT_FAILED, EXIT_INCONCLUSIVE = 1, 3
SUMMARY = __doc__.split("\n\n")[0]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from converters import conventions

    ap.add_argument("--model-path", required=True, help="HF model dir (local)")
    ap.add_argument("--reference", help="MaxText Orbax checkpoint: compare logits, and score every convention")
    ap.add_argument("--query-scale", choices=("fold", "none"),
                    help="with --reference: the convention to check (default: kdgen_convert.json's)")
    ap.add_argument("--rope-scaling", choices=("llama3", "none"), help="likewise")
    ap.add_argument("--rope-layout", choices=("interleaved", "half"), help="likewise")
    ap.add_argument("--normalize-embedding-logits", choices=("true", "false"), help="likewise (tied embeddings)")
    ap.add_argument("--tolerance", type=float, help="relative logits tolerance (default 1e-4 f32, 3e-2 bf16)")
    ap.add_argument("--probe-text", metavar="FILE", help="a text file for the language and conventions checks (blank lines separate "
                    "sequences); default: built-in English documents")
    ap.add_argument("--probe-max-loss", type=float,
                    help="language check threshold in nats/token (default 0.75 x ln(vocab_size))")
    ap.add_argument("--probe-margin", type=float, default=conventions.DEFAULT_MARGIN,
                    help="the least mean loss difference (nats/token) taken as a decision between two conventions "
                    "(a decision also needs %g standard errors of the measured differences)" % conventions.Z)
    ap.add_argument("--accept", action="append", choices=("query_scale", "rope_layout", "rope_scaling", "normalize"),
                    help="take this convention as the model dir states it instead of checking it (repeatable); the "
                    "conventions line says so. For an option the probe cannot see (usually rope_scaling)")
    ap.add_argument("--no-language-check", action="store_true",
                    help="skip the language check (random-weight test models)")
    ap.add_argument("--vllm", action="store_true", help="also load in vLLM and compare greedy tokens")
    ap.add_argument("--vllm-tokens", type=int, default=12)
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-timeout", type=float, default=300)


# Checks: config (fields, head_dim, untied embeddings, rope settings), generation_config,
# tokenizer (files, loads, vocab fits the embedding), index (every shard present, every tensor
# where the index says, no strays, total_size), tensors (names, shapes and dtype against the
# config), finite (no NaN/Inf), transformers (loads, forward on a fixed prompt), language (the
# model's next-token loss on the probe text, with its own tokenizer, is below a threshold: a
# model that does not predict text fails), reference (logits against converters.reference's
# forward of the MaxText checkpoint with the conventions the model was converted with),
# conventions (the losses of every convention on the probe text, from the MaxText checkpoint with
# --reference, else from the converted weights: PASS only when the converted convention beats every
# other clearly, FAIL when another beats it clearly, INCONCLUSIVE when the probe cannot tell them
# apart, so a consistent mistake never passes), vllm (the real engine greedy-generates the same
# tokens as transformers).
def run(args: argparse.Namespace) -> int:
    """Run every check in order; the exit status (0, EXIT_FAILED or EXIT_INCONCLUSIVE)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    r = Report()
    path = args.model_path
    cfg = check_config(path, r)
    if cfg is not None:
        check_generation_config(path, r)
        tok = check_tokenizer(path, cfg, r)
        m = logits = None
        if check_files(path, cfg, r):
            m, logits = check_transformers(path, cfg, r)
        else:
            r(None, "transformers", "the weight files failed their checks")
        if m is not None and not args.no_language_check:
            check_language(path, m, cfg, args, r)
        elif args.no_language_check:
            r(None, "language", "--no-language-check")
        conv = converted_with(path, args)
        params, d = _reference(args, conv, cfg, logits, r)
        if m is None:
            r(INCONCLUSIVE, "conventions", "not checked: the model does not load")
        elif not args.reference or params is not None:
            check_conventions(path, conv, cfg, args, r, params, d)
        if args.vllm:
            if m is not None:
                check_vllm(path, m, tok, cfg, args, r)
            else:
                r(False, "vllm", "skipped: the model does not load in transformers")
    return _summary(r)


def _reference(args, conv: dict, cfg: dict, logits, r: Report):
    """With --reference: the checkpoint's params and dims (None, None when they cannot be compared)."""
    if not args.reference:
        return None, None
    missing = [k for k in ("query_scale", "rope_layout", "rope_scaling") if conv[k] is None]
    if missing:
        r(False, "reference", f"--reference needs --{missing[0].replace('_', '-')} (the model dir has no "
          "kdgen_convert.json saying how it was converted)")
        return None, None
    if logits is None:
        r(False, "reference", "no transformers logits to compare")
        return None, None
    params, d = load_reference(args.reference, cfg, r)
    if params is not None:
        check_reference(params, d, conv, cfg, logits, args, r)
    return params, d


def _summary(r: Report) -> int:
    if r.failed:
        print(f"FAILED: {', '.join(r.failed)}" + (f"; INCONCLUSIVE: {', '.join(r.inconclusive)}" if r.inconclusive
                                                    else ""), flush=True)
        return EXIT_FAILED
    if r.inconclusive:
        print(f"INCONCLUSIVE: {', '.join(r.inconclusive)} (no check failed, but these could not tell a right "
              "conversion from a wrong one)", flush=True)
        return EXIT_INCONCLUSIVE
    print("ALL CHECKS PASSED", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=SUMMARY)
    add_arguments(ap)
    return run(ap.parse_args(argv))

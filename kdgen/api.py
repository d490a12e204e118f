"""The Python API: `kdgen.generate(model, data, ...)` for lists that fit in memory.

    import kdgen
    rows = kdgen.generate("/models/teacher", [{"prompt": "Why is the sky blue?"}],
                          system="Answer briefly.", n=1, temperature=0.7, max_tokens=256)
    rows[0]["results"]   # a string (n=1) or a list of n strings

It runs on the job's own machinery (JobConfig, PromptBuilder for the chat template, the same
engines), without files: rows go straight to the engine and come back in input order. For a
corpus on disk or GCS, with resume and many hosts, use `kdgen run`.
"""

from __future__ import annotations

import copy
import dataclasses

from kdgen import config as config_mod
from kdgen.config import JobConfig
from kdgen.engines.base import Finished, Request
from kdgen.engines.pool import ListSource, RequestPool, in_flight_target, pump
from kdgen.prompts import Prompt, PromptBuilder, load_tokenizer

UNLIMITED = 1 << 30


def api_config(model: str | None, engine, settings: dict) -> JobConfig:
    """The JobConfig of a call of the Python API (generate, score): its settings, no files."""
    if not model and engine is None:
        raise ValueError("pass model= (a HF model directory) or engine=")
    flags = {"model_path": model or _engine_model(engine), "dataset_path": "-", "output_path": "-",
             "max_target_length": UNLIMITED, "max_prefill_length": UNLIMITED - 1, "log_every_s": 1e9}
    flags.update({k: v for k, v in settings.items() if v is not None})
    return config_mod.from_sources(flags, env={})


def _engine_model(engine) -> str:
    inner = getattr(engine, "inner", engine)  # a ScoringEngine wraps a VllmEngine
    return getattr(inner, "tokenizer_path", None) or getattr(inner, "model", "-")


def engine_and_tokenizer(c: JobConfig, engine, tokenizer):
    """(engine, tokenizer, own): the ones given, else started / loaded for c; own: the caller
    started the engine and closes it."""
    own = engine is None
    if own:
        from kdgen.engines.factory import make_engine

        engine = make_engine(c)
    try:
        engine.set_sampling(c)
        if tokenizer is None:
            from kdgen.engines.vllm_engine import localize_model

            tokenizer = load_tokenizer(localize_model(c.tokenizer))
    except BaseException:
        if own:
            engine.close()
        raise
    return engine, tokenizer, own


def drain(engine, prompts: list[Prompt], in_flight: int = 1024) -> dict[int, Finished]:
    """Send every good prompt (at most in_flight at a time), collect {row_idx: Finished}."""
    requests = [Request(p.row_idx, p.token_ids, p.max_tokens, p.messages) for p in prompts if p.error is None]
    results: dict[int, Finished] = {}
    pump(RequestPool(engine, in_flight, refill=1), ListSource(requests), results.__setitem__)
    return results


def generate(
    model: str | None,
    data: list,
    message_key: str = "prompt",
    system: str | None = None,
    n: int = 1,
    temperature: float = 0.8,
    max_tokens: int = 1024,
    tp: int = 1,
    result_key: str = "results",
    *,
    prompt_mode: str = "chat",
    engine=None,
    tokenizer=None,
    endpoint: str | None = None,
    **settings,
) -> list[dict]:
    """Complete every row of `data` (dicts, or bare strings) and return copies with results added.

    data[i][message_key] is a string (one user turn) or a list of {role, content} messages (a
    trailing assistant turn is dropped and regenerated). `system` is put before each conversation.
    Results: a string for n=1, a list of n strings for n>1; a row that cannot be generated gets
    None and `<result_key>_error` with the reason. prompt_mode="prefix" continues raw text instead
    of applying the chat template. `engine=` reuses a started engine (in-process or endpoint);
    `endpoint=` uses an OpenAI-compatible server; other JobConfig knobs (top_p, top_k, stop,
    logprobs, dtype, max_model_len, enforce_eager, ...) pass through **settings.
    """
    rows = [dict(r) if isinstance(r, dict) else {message_key: r} for r in data]
    c = api_config(model, engine, dict(
        prompt_mode=prompt_mode, messages_column=message_key if prompt_mode == "chat" else "",
        text_column=message_key, system_prompt=system or "", num_samples=n, temperature=temperature,
        max_tokens=max_tokens, tensor_parallel_size=tp, endpoint=endpoint or "", **settings))
    eng, tok, own = engine_and_tokenizer(c, engine, tokenizer)
    try:
        # Budgets come from the model: the whole context, the completion capped by max_tokens.
        ctx = eng.max_model_len
        c = dataclasses.replace(c, max_target_length=ctx, max_prefill_length=ctx - 2)
        builder = PromptBuilder(c, tok, ctx)
        prompts = builder.build([r.get(message_key) for r in rows], 0)
        results = drain(eng, prompts, in_flight_target(c, eng))
    finally:
        if own:
            eng.close()
    out = []
    for r, p in zip(rows, prompts):
        r = copy.copy(r)
        f = results.get(p.row_idx)
        error = p.error or (f.error if f is not None else "no result")
        if error is None:
            texts = [s.text for s in sorted(f.samples, key=lambda s: s.index)]
            r[result_key] = texts[0] if n == 1 else texts
        else:
            r[result_key] = None
            r[f"{result_key}_error"] = error
        out.append(r)
    return out

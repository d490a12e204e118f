"""The in-process vLLM engine, behind the engine contract (kdgen.engines.base).

The runner keeps `num_unfinished()` near GEN_BATCH_SIZE, so the engine stays full across chunk
boundaries. `VllmEngine` runs vLLM in-process (tensor / pipeline parallel); vLLM's internals are
in kdgen.engines.vllm_adapter. Outputs take the lean path (kdgen.engines.vllm_lean) where the
adapter allows it and the job needs no vLLM text (stop strings) nor prompt logprobs; else vLLM's
own output processor. Both give the same records, byte for byte (tests/test_lean.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from kdgen.engines import compile_cache, vllm_adapter
from kdgen.config import ConfigError, JobConfig
from kdgen.engines.base import EngineError, EngineRequest, Finished, Sample
from kdgen.engines.startup_log import OutputTail, first_line, root_cause
from kdgen.engines.text_decode import INVALID_PREFIX_ERR_MSG, stream_decoder  # noqa: F401 (kdgen's API)
from kdgen.engines.vllm_lean import LeanOutputs, add_output

log = logging.getLogger(__name__)


VLLM_LOGPROBS_MODES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}
VLLM_DEFAULT_MAX_LOGPROBS = 20  # vLLM caps logprobs per position at 20 unless the engine says otherwise


def sampling_kwargs(c: JobConfig) -> dict:
    kw = dict(
        n=c.num_samples,
        temperature=c.temperature,
        top_p=c.top_p,
        top_k=c.top_k if c.top_k > 0 else -1,
        stop=c.stop_list or None,
        skip_special_tokens=True,
    )
    if c.logprobs > 0:
        kw["logprobs"] = c.logprobs
        # vLLM's FlatLogprobs: a few flat lists per request instead of a dict per position
        # (less GC in vLLM's output processing, and a cheap conversion here).
        kw["flat_logprobs"] = True
        if c.prompt_logprobs:  # the top-k of every prompt position too (raw, as vLLM computes them)
            kw["prompt_logprobs"] = c.logprobs
        if not kw["stop"]:
            # vLLM would decode each of the k+1 logprob tokens of every position to a string
            # (4x the cost of generating, at k=20 on the CPU engine); we store ids, and decode
            # the completion text ourselves as vLLM would (text_decoder). Stop strings need
            # vLLM's text.
            kw["detokenize"] = False
    return kw


def engine_logprobs_kwargs(c: JobConfig) -> dict:
    """Engine-wide logprobs settings: which logprobs (raw or processed), and a cap high enough
    for LOGPROBS (vLLM refuses k > max_logprobs, 20 by default)."""
    return {"logprobs_mode": VLLM_LOGPROBS_MODES[c.logprobs_mode],
            "max_logprobs": max(VLLM_DEFAULT_MAX_LOGPROBS, c.logprobs)}


def convert_logprobs(token_ids: list[int], positions, k: int):
    """vLLM's per-position logprobs -> (token logprob per position, top-k ids, top-k logprobs).

    `positions` is vLLM's FlatLogprobs (flat_logprobs=True), a list of {token_id: Logprob} dicts,
    or a list of dicts of (logprob, rank) tuples (the endpoint engine). In FlatLogprobs every
    position holds the position's own token first, then the top-k by rank (vLLM's sampler
    gathers [token, top-1 .. top-k]): slices, no sorting."""
    starts = getattr(positions, "start_indices", None)
    if starts is not None:
        ends, ids, lps = positions.end_indices, positions.token_ids, positions.logprobs
        n = len(token_ids)
        token_lps = [lps[s] if e > s else None for s, e in zip(starts[:n], ends[:n])]
        top_ids = [ids[s + 1:min(e, s + 1 + k)] for s, e in zip(starts[:n], ends[:n])]
        top_lps = [lps[s + 1:min(e, s + 1 + k)] for s, e in zip(starts[:n], ends[:n])]
        return token_lps, top_ids, top_lps
    token_lps, top_ids, top_lps = [], [], []
    for tid, d in zip(token_ids, positions):
        token_lps.append(d[tid].logprob if tid in d else None)
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:k]
        top_ids.append([t for t, _ in ranked])
        top_lps.append([lp.logprob for _, lp in ranked])
    return token_lps, top_ids, top_lps


def seeds_need_whole_prefills() -> bool:
    """True on vLLM's CPU platform: per-request SamplingParams(seed=...) kill its engine when a
    prompt's prefill is split across steps. vLLM then rewinds the request's torch.Generator with
    set_offset() for the token it throws away (gpu_model_runner), and torch's CPU generator has no
    offset ("CPU Generator does not use offset"; seen with 512 prompts in one step, not with 64).
    With chunked prefill off no prefill is split: 512 seeded prompts ran and repeated exactly."""
    return vllm_adapter.is_cpu_platform()


def seeds_unsafe(llm) -> str | None:
    """Why this engine (an `LLM`) must not get per-request seeds, or None if it may."""
    if seeds_need_whole_prefills() and vllm_adapter.VllmAdapter(llm).chunked_prefill:
        return "vLLM's CPU engine dies on per-request seeds when it splits a prefill (chunked prefill is on)"
    return None


def localize_model(path: str) -> str:
    """vLLM loads from local disk: a gs:// model or tokenizer directory is copied into the private
    kdgen cache, verified before each use and fetched again when its source changed
    (kdgen.engines.model_cache)."""
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    from kdgen.engines import model_cache

    return model_cache.localize(path)


def check_model_dir(local: str, given: str) -> None:
    """Fail in a second, not after a minute of engine start, on a directory that is not HF."""
    if not os.path.isdir(local):
        raise ConfigError(f"MODEL_PATH {given!r} is not a directory")
    if not os.path.exists(os.path.join(local, "config.json")):
        raise ConfigError(f"MODEL_PATH {given!r} is not a HuggingFace model directory: no config.json")
    if not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(local)):
        raise ConfigError(f"MODEL_PATH {given!r} has config.json but no *.safetensors weights")


class VllmEngine:
    """In-process vLLM: streaming add/step, by the lean output path or by vLLM's own."""

    max_model_len: int
    max_num_seqs: int
    lean_allowed = True  # False: always vLLM's own output path (tests and benches compare the two)

    def __init__(self, c: JobConfig, model_path: str | None = None, tokenizer_path: str | None = None):
        from vllm import LLM, SamplingParams

        vllm_adapter.check_supported()
        self._SamplingParams = SamplingParams
        model_path = model_path or localize_model(c.model_path)
        check_model_dir(model_path, c.model_path)
        t0 = time.time()
        self.llm = self._start(LLM, engine_kwargs(c, model_path, tokenizer_path), c.model_path)
        log.info("vLLM engine ready in %.1f s", time.time() - t0)
        self.vllm = vllm_adapter.VllmAdapter(self.llm)
        self._closed = threading.Event()
        threading.Thread(target=self.vllm.watch_dead, args=(self._closed,), name="kdgen-engine-watch",
                         daemon=True).start()
        self.max_model_len = self.vllm.max_model_len
        self.max_num_seqs = self.vllm.max_num_seqs
        self.tokenizer_path = self.vllm.tokenizer_path  # the tokenizer vLLM loaded (kdgen.api names the model by it)
        self._ids: dict[str, str] = {}  # vLLM request id -> our request id (vLLM's output path)
        self._lean = LeanOutputs()  # requests on the lean path
        tok = self.vllm.fast_tokenizer()
        self._text_decoder = stream_decoder(tok) if tok is not None else None
        self._no_seeds = seeds_unsafe(self.llm)
        self._share_params = vllm_adapter.shared_params_safe()  # no deepcopy of the params per request
        self.lean_off = choose_output_path(self.vllm, self._lean.by_internal)  # why the lean path cannot run here, or None
        self.set_sampling(c)

    @staticmethod
    def _start(LLM, kwargs: dict, given: str):
        """LLM(**kwargs) in this rank's compile cache. A failed start with a compile cache in
        place starts once more with that cache moved aside (kdgen.engines.compile_cache)."""
        root = compile_cache.use_rank_cache()
        tail = OutputTail()
        try:
            with tail:
                return LLM(**kwargs)
        except Exception as e:  # vLLM raises many types; the message is what matters
            first = root_cause(tail.text()) or first_line(e)
            moved = compile_cache.move_aside(root)
            if moved is None:
                raise EngineError(f"vLLM could not start for MODEL_PATH {given!r}: {first}") from e
        log.warning("vLLM start failed (%s), perhaps on a corrupt compile cache: moved %s aside to %s and starting "
                    "once more (it compiles again)", first, compile_cache.compile_dir(root), moved)
        tail = OutputTail()
        try:
            with tail:
                return LLM(**kwargs)
        except Exception as e:
            raise EngineError(f"vLLM could not start for MODEL_PATH {given!r}, also with a fresh compile cache: "
                              f"{root_cause(tail.text()) or first_line(e)} (first try: {first})") from e

    def set_sampling(self, c: JobConfig) -> None:
        """Sampling settings for requests added from now on (one engine serves many jobs in tests
        and in the Python API)."""
        self._base = sampling_kwargs(c)
        if self._share_params:
            self._base["skip_clone"] = True
        self._logprobs_k = c.logprobs
        if self._text_decoder is None:  # vLLM's slow detokenizer: let vLLM decode
            self._base.pop("detokenize", None)
        self._decode = not self._base.get("detokenize", True)
        self._params: dict[tuple, object] = {}
        # Lean: no stop strings (vLLM's detokenizer finds them), a text decoder as vLLM's, no
        # prompt logprobs (scoring: vLLM's path builds them).
        self._lean_ok = (self.lean_off is None and not self._base.get("stop") and self._text_decoder is not None
                         and "prompt_logprobs" not in self._base)
        # Seeds only matter when sampling; a seeded request needs its own SamplingParams.
        self.seeded = c.temperature > 0 and self._no_seeds is None
        if c.temperature > 0 and self._no_seeds:
            log.warning("sampling is not reproducible on this engine: per-request seeds are off (%s); a chunk "
                        "generated again draws other completions", self._no_seeds)

    def params(self, max_tokens: int, seed: int | None = None, **extra):
        if seed is not None and self.seeded:
            return self._SamplingParams(**{**self._base, "max_tokens": max_tokens, "seed": seed, **extra})
        key = (max_tokens, tuple(sorted(extra.items())))
        sp = self._params.get(key)
        if sp is None:
            sp = self._SamplingParams(**{**self._base, "max_tokens": max_tokens, **extra})
            self._params[key] = sp  # shared by every request with this budget, as LLM.generate does
        return sp

    def add_many(self, requests: list[EngineRequest], **extra) -> None:
        """Queue (request_id, prompt_token_ids, max_tokens[, messages[, seed]]) requests in one call
        (messages are for chat endpoints; the token ids already hold the templated chat; the seed
        is used where this platform supports per-request seeds)."""
        if not requests:
            return
        prompts = [{"prompt_token_ids": r[1]} for r in requests]
        params = [self.params(r[2], r[4] if len(r) > 4 else None, **extra) for r in requests]
        lean = self._lean_ok and self.lean_allowed and not extra
        try:
            ids = self.vllm.enqueue_lean(prompts, params) if lean else self.vllm.enqueue(prompts, params)
        except Exception as e:
            raise EngineError(f"vLLM refused requests: {e}") from e
        for r, vid in zip(requests, ids):
            if lean:
                self._lean.add(r[0], r[1], vid)
            else:
                self._ids[vid] = r[0]

    def num_unfinished(self) -> int:
        return len(self._ids) + len(self._lean)

    def step(self) -> list[Finished]:
        try:
            if len(self._lean):
                outputs = self.vllm.lean_step(self._lean.by_internal, add_output, self._lean.finish)
            else:
                outputs = self.vllm.step()
        except Exception as e:
            raise EngineError(f"vLLM engine died: {type(e).__name__}: {e}") from e
        done = self._lean.take_finished(self._logprobs_k, self._text_decoder, vllm_text=not self._decode)
        return done + self._finished(outputs) if outputs else done

    def _finished(self, outputs) -> list[Finished]:
        """vLLM's RequestOutputs -> Finished, for the requests that ended."""
        done = []
        k = self._logprobs_k
        for out in outputs:
            if not out.finished:
                continue
            rid = self._ids.pop(out.request_id, None)
            if rid is None:  # aborted meanwhile
                continue
            samples = []
            for o in out.outputs:
                s = Sample(o.index, list(o.token_ids), o.text.strip(), o.finish_reason)
                if self._decode:
                    s.text = self._text_decoder(out.prompt_token_ids, s.token_ids).strip()
                if k and o.logprobs is not None:
                    s.token_logprobs, s.top_token_ids, s.top_logprobs = convert_logprobs(
                        s.token_ids, o.logprobs, k)
                samples.append(s)
            done.append(Finished(rid, samples, prompt_logprobs=out.prompt_logprobs))
        return done

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests (ours, as given to add_many); unknown or finished ones are skipped."""
        drop = set(request_ids)
        vids = [vid for vid, rid in self._ids.items() if rid in drop]
        for vid in vids:
            del self._ids[vid]
        self._abort(vids, self._lean.drop(drop))

    def abort_all(self) -> None:
        """Drop every request in flight, so that a stopped job hands a reused engine back empty."""
        ids, self._ids = list(self._ids), {}
        self._abort(ids, self._lean.drop(list(self._lean.requests)))

    def _abort(self, vids: list[str], internal_ids: list[str]) -> None:
        try:
            if vids:
                self.vllm.abort(vids)
            if internal_ids:
                self.vllm.abort_lean(internal_ids)
        except Exception as e:  # a dead engine has nothing to abort
            log.debug("abort: %s", e)

    def close(self) -> None:
        self._closed.set()
        try:
            self.vllm.shutdown()
        except Exception:  # best effort at exit
            pass


def choose_output_path(adapter, lean_ids: dict) -> str | None:
    """Turn the lean output path on where the adapter allows it; else say once why not."""
    why = adapter.enable_lean(lean_ids)
    if why:
        log.info("vLLM output: vLLM's own output processor, not the lean path (%s)", why)
    return why


def engine_kwargs(c: JobConfig, model_path: str, tokenizer_path: str | None) -> dict:
    """LLM(...) arguments for this job's engine."""
    kwargs = dict(
        model=model_path,
        tokenizer=tokenizer_path or localize_model(c.tokenizer),
        tensor_parallel_size=c.tensor_parallel_size,
        pipeline_parallel_size=c.pipeline_parallel_size,
        dtype=c.dtype,
        gpu_memory_utilization=c.gpu_memory_utilization,
        enforce_eager=c.enforce_eager,
        seed=c.seed,
        **engine_logprobs_kwargs(c),
    )
    if c.max_model_len > 0:
        kwargs["max_model_len"] = c.max_model_len
    if c.pipeline_parallel_size > 1:
        # The offline LLM runs pipeline parallel only on the multiprocessing or ray backend.
        kwargs["distributed_executor_backend"] = "mp"
    if c.temperature > 0 and c.task == "generate" and seeds_need_whole_prefills():
        kwargs["enable_chunked_prefill"] = False  # so that per-request seeds are safe (see there)
        log.info("vLLM CPU engine: chunked prefill off, so that per-request sampling seeds work "
                 "(torch's CPU generator cannot rewind a split prefill's token)")
    return kwargs

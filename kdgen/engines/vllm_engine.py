"""The in-process vLLM engine, behind the engine contract (kdgen.engines.base).

The runner keeps `num_unfinished()` near GEN_BATCH_SIZE, so the engine stays full across chunk
boundaries instead of draining at the end of every chunk. `VllmEngine` runs vLLM in-process
(tensor / pipeline parallel); the endpoint engine (kdgen.engines.endpoint) talks to a running server.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

from kdgen.engines import compile_cache
from kdgen.config import ConfigError, JobConfig
from kdgen.engines.base import EngineError, EngineRequest, Finished, Sample

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


def text_decoder(llm):
    """(prompt ids, completion ids) -> the completion text exactly as vLLM's
    FastIncrementalDetokenizer makes it, for requests sent with detokenize=False (stream_decoder).
    None where vLLM would use its slow detokenizer."""
    try:
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        tok = llm.get_tokenizer()
        if not uses_fast_detokenizer(tok):
            return None
    except (ImportError, AttributeError):
        return None
    return stream_decoder(tok)


# tokenizers' message for a stream it cannot continue (vLLM's INVALID_PREFIX_ERR_MSG)
INVALID_PREFIX_ERR_MSG = "Invalid prefix encountered"


def stream_decoder(tok):
    """(prompt ids, completion ids) -> the completion text as vLLM's fast detokenizer makes it:
    tokenizers' DecodeStream primed with the prompt, special tokens skipped, an incomplete UTF-8
    character at the end left out. None if `tok` has no fast (tokenizers) backend."""
    import tokenizers

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return None

    def decode(prompt_ids: list[int], ids: list[int]) -> str:
        stream = tokenizers.decoders.DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
        parts = []
        for t in ids:
            try:
                piece = stream.step(backend, t)
            except (OverflowError, TypeError):
                piece = None
            except Exception as e:  # as vLLM: restart the stream on tokenizers' invalid-prefix error
                if not str(e).startswith(INVALID_PREFIX_ERR_MSG):
                    raise
                stream = tokenizers.decoders.DecodeStream(skip_special_tokens=True)
                piece = stream.step(backend, t)
            if piece:
                parts.append(piece)
        return "".join(parts)

    return decode


def seeds_need_whole_prefills() -> bool:
    """True on vLLM's CPU platform: per-request SamplingParams(seed=...) kill its engine when a
    prompt's prefill is split across steps. vLLM then rewinds the request's torch.Generator with
    set_offset() for the token it throws away (gpu_model_runner), and torch's CPU generator has no
    offset ("CPU Generator does not use offset"; seen with 512 prompts in one step, not with 64).
    With chunked prefill off no prefill is split: 512 seeded prompts ran and repeated exactly."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def seeds_unsafe(llm) -> str | None:
    """Why this engine must not get per-request seeds, or None if it may."""
    if seeds_need_whole_prefills() and llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill:
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
    """In-process vLLM: streaming add/step over `LLM.enqueue` and `llm_engine.step`."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self, c: JobConfig, model_path: str | None = None, tokenizer_path: str | None = None):
        from vllm import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        model_path = model_path or localize_model(c.model_path)
        check_model_dir(model_path, c.model_path)
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
        t0 = time.time()
        self.llm = self._start(LLM, kwargs, c.model_path)
        log.info("vLLM engine ready in %.1f s", time.time() - t0)
        self._closed = threading.Event()
        threading.Thread(target=self._watch_engine_core, name="kdgen-engine-watch", daemon=True).start()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.max_num_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        self._ids: dict[str, str] = {}  # vLLM request id -> our request id
        self._text_decoder = text_decoder(self.llm)
        self._no_seeds = seeds_unsafe(self.llm)
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
            first = root_cause(tail.text()) or _first_line(e)
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
                              f"{root_cause(tail.text()) or _first_line(e)} (first try: {first})") from e

    def set_sampling(self, c: JobConfig) -> None:
        """Sampling settings for requests added from now on (one engine serves many jobs in tests
        and in the Python API)."""
        self._base = sampling_kwargs(c)
        self._logprobs_k = c.logprobs
        if self._text_decoder is None:  # vLLM's slow detokenizer: let vLLM decode
            self._base.pop("detokenize", None)
        self._decode = not self._base.get("detokenize", True)
        self._params: dict[tuple, object] = {}
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
        try:
            vllm_ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        except Exception as e:
            raise EngineError(f"vLLM refused requests: {e}") from e
        for r, vid in zip(requests, vllm_ids):
            # enqueue returns the internal id "<counter>-<random>"; outputs carry "<counter>".
            self._ids[vid.split("-", 1)[0]] = r[0]

    def num_unfinished(self) -> int:
        return len(self._ids)

    def step(self) -> list[Finished]:
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as e:
            raise EngineError(f"vLLM engine died: {type(e).__name__}: {e}") from e
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
        if vids:
            try:
                self.llm.llm_engine.abort_request(vids)
            except Exception as e:  # a dead engine has nothing to abort
                log.debug("abort: %s", e)

    def abort_all(self) -> None:
        """Drop every request in flight, so that a stopped job hands a reused engine back empty."""
        ids, self._ids = list(self._ids), {}
        if ids:
            try:
                self.llm.llm_engine.abort_request(ids)
            except Exception as e:  # a dead engine has nothing to abort
                log.debug("abort: %s", e)

    def _watch_engine_core(self) -> None:
        """vLLM's sync client notices a dead EngineCore process (engine_dead) but leaves step()
        blocked on its output queue forever; wake it with EngineDeadError so the job can stop
        cleanly, keep its finished chunks, and say why."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        resources, outputs = getattr(core, "resources", None), getattr(core, "outputs_queue", None)
        if resources is None or outputs is None or not hasattr(resources, "engine_dead"):
            return  # another vLLM layout: nothing to watch
        while not self._closed.wait(1.0):
            if resources.engine_dead:
                from vllm.v1.engine.exceptions import EngineDeadError

                outputs.put_nowait(EngineDeadError())
                return

    def close(self) -> None:
        self._closed.set()
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort at exit
            pass


class OutputTail:
    """Keeps the last lines written to file descriptors 1 and 2 while active, by this process and
    by the processes it starts meanwhile: vLLM's EngineCore and workers log their start-up failure
    there (vLLM logs to stdout unless VLLM_LOGGING_STREAM says otherwise), while the parent only
    says "Engine core initialization failed. See root cause above". Everything is still written
    where it went; a child keeps the pipes as its stdout/stderr, so the forwarding threads run on
    after the block."""

    def __init__(self, keep: int = 400, fds: tuple[int, ...] = (1, 2)):
        self.lines: list[str] = []
        self.keep, self.fds = keep, fds
        self._saved: dict[int, int] = {}
        self._lock = threading.Lock()

    def __enter__(self):
        import sys

        for fd in self.fds:
            try:
                (sys.stdout if fd == 1 else sys.stderr).flush()
                saved = os.dup(fd)
                read_fd, write_fd = os.pipe()
                os.dup2(write_fd, fd)
                os.close(write_fd)
            except OSError:  # no such descriptor to speak of: leave it alone
                continue
            self._saved[fd] = saved
            threading.Thread(target=self._forward, args=(read_fd, os.dup(saved)), name=f"kdgen-tail-{fd}",
                             daemon=True).start()
        return self

    def _forward(self, read_fd: int, out: int) -> None:
        buf = b""
        with os.fdopen(read_fd, "rb", buffering=0) as src:
            while True:
                chunk = src.read(65536)
                if not chunk:
                    break
                try:
                    os.write(out, chunk)
                except OSError:
                    pass
                buf += chunk
                *done, buf = buf.split(b"\n")
                with self._lock:
                    self.lines.extend(x.decode("utf-8", "replace") for x in done)
                    del self.lines[:-self.keep]
        os.close(out)

    def __exit__(self, *exc):
        import sys

        for fd, saved in self._saved.items():
            (sys.stdout if fd == 1 else sys.stderr).flush()
            os.dup2(saved, fd)  # this process writes where it did before
            os.close(saved)
        if self._saved:
            time.sleep(0.2)  # let the forwarders take in what a failing child wrote last
        self._saved = {}
        return False

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


# `SomeError: message` after the prefixes vLLM puts on its processes' log lines:
# "(EngineCore pid=N) ERROR 12-02 13:43:15 [core.py:1510] ValueError: ...".
EXCEPTION_LINE = re.compile(r"^(?:\([^)]*\) )?(?:[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] )?"
                            r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)(?:: .+)?)$")


def root_cause(log_text: str) -> str:
    """The last exception line of a log that is not a pointer to another ("See root cause above",
    "See stack trace for root cause"): the EngineCore's or its worker's start-up failure; "" if none."""
    found = ""
    for line in log_text.splitlines():
        m = EXCEPTION_LINE.match(line.rstrip())
        if m and "root cause" not in m.group(1):
            found = m.group(1)
    return found[:500]


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__



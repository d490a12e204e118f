"""The endpoint engine: the engine contract over an OpenAI-compatible server (vllm serve, SGLang, ...).

`--endpoint_api completions` sends token-id prompts (the exact tokens the in-process engine gets);
`chat` sends chat/completions messages. `add_many` hands requests to CONCURRENCY threads; `step()`
waits briefly and returns the finished ones. The HTTP side (retries, credentials, reply caps, which
status stops the job) is kdgen.engines.http. A 4xx that is the row's fault becomes its error record
(Finished.error) unless it is job-wide: refusals are held back until a request succeeds; none
succeeding before JOB_WIDE_REFUSALS refusals (or every request refused), or that many in a row with
one message, stops the job (e.g. LOGPROBS above the server's --max-logprobs). Latency, usage and
attempts go into Finished.metadata; reasoning text (`reasoning_content`) into Sample.reasoning.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

from kdgen import redact
from kdgen.config import JobConfig
from kdgen.engines.base import EngineError, EngineRequest, Finished, Logprob, Sample
from kdgen.engines.http import HttpClient, RowError

log = logging.getLogger(__name__)

# A 4xx on each of the first this-many requests with none succeeding, or on this many in a row with
# the same message, is the server's answer about the job's settings, not about the rows.
JOB_WIDE_REFUSALS = 8


class EndpointEngine:
    """Streaming add/step over an OpenAI-compatible HTTP server (vLLM, SGLang, ...)."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self, c: JobConfig):
        self.http = HttpClient(c.endpoint, c.endpoint_api_key, c.request_timeout_s, c.max_retries)
        self.base = self.http.base  # never holds user:password
        self._auth = self.http.auth  # the same object: a key changed on it is the key of every request
        self.api = c.endpoint_api
        self.model, self.max_model_len = self._discover(c)
        self.max_num_seqs = c.concurrency  # GEN_BATCH_SIZE 0 keeps twice this many queued
        self.pool = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="kdgen-http")
        self._done: queue.Queue = queue.Queue()
        self._pending = 0
        self._calls: dict[str, Future] = {}  # request id -> its HTTP call, until its reply is taken
        self._epoch = 0  # abort_all starts a new one; replies of an older one are dropped
        self._succeeded = 0  # requests answered with a completion
        self._held: list[Finished] = []  # refusals since the last success: job-wide until proven not
        self.set_sampling(c)
        log.info("endpoint %s: model %r, max_model_len %d, api %s, concurrency %d, credentials: %s",
                 self.base, self.model, self.max_model_len, self.api, c.concurrency, self.http.auth_kind or "none")

    def _discover(self, c: JobConfig) -> tuple[str, int]:
        """The served model (from /v1/models) and its context length."""
        try:
            reply, _ = self.http.call("GET", "/models")
        except RowError as e:
            raise EngineError(f"--endpoint {self.base}: GET /models failed: {e}") from None
        models = reply.get("data") or []
        if not models:
            raise EngineError(f"--endpoint {self.base} serves no model (GET /models is empty)")
        if len(models) == 1:
            m = models[0]
        else:
            wanted = {c.model_path, c.model_path.rstrip("/").rsplit("/", 1)[-1]}
            found = [m for m in models if m.get("id") in wanted or m.get("root") in wanted]
            if len(found) != 1:
                raise EngineError(f"--endpoint {self.base} serves {[m.get('id') for m in models]}; "
                                  f"none matches MODEL_PATH {c.model_path!r}")
            m = found[0]
        max_len = m.get("max_model_len") or c.max_model_len or c.max_target_length
        return m["id"], int(max_len)

    # ---- engine interface ---------------------------------------------------------------------
    def set_sampling(self, c: JobConfig) -> None:
        if self.api == "chat" and c.prompt_mode != "chat" and c.task != "score":
            raise EngineError("--endpoint_api chat sends chat messages: it needs --prompt_mode chat "
                              "(or use --endpoint_api completions)")
        body = {"model": self.model, "temperature": c.temperature, "top_p": c.top_p}
        if c.top_k > 0:
            body["top_k"] = c.top_k
        if c.stop_list:
            body["stop"] = c.stop_list
        if c.num_samples > 1:
            body["n"] = c.num_samples
        # vLLM extensions (other servers ignore unknown fields or we fall back to the text).
        body["return_token_ids"] = True
        body["skip_special_tokens"] = True
        self._logprobs_k = c.logprobs
        if c.logprobs > 0:
            body["return_tokens_as_token_ids"] = True
            if self.api == "chat":
                body.update(logprobs=True, top_logprobs=c.logprobs)
            else:
                body["logprobs"] = c.logprobs
            if c.prompt_logprobs:  # vLLM's extension; the reply's prompt_logprobs are parsed below
                body["prompt_logprobs"] = c.logprobs
        self._base_body = body

    def add_many(self, requests_: list[EngineRequest], **extra) -> None:
        """Queue (request_id, prompt_token_ids, max_tokens[, messages]) requests. `extra` goes
        into the request body (scoring: prompt_logprobs=k)."""
        for r in requests_:
            rid, ids, max_tokens = r[0], r[1], r[2]
            messages = r[3] if len(r) > 3 else None
            body = {**self._base_body, "max_tokens": max_tokens, **extra}
            if self.api == "chat" and "prompt_logprobs" not in extra:
                if not messages:
                    raise EngineError(f"--endpoint_api chat: request {rid} has no chat messages")
                body["messages"] = messages
                path = "/chat/completions"
            else:
                body["prompt"] = ids
                path = "/completions"
            self._pending += 1
            self._calls[rid] = self.pool.submit(self._run_one, rid, path, body, len(ids), self._epoch)

    def num_unfinished(self) -> int:
        return self._pending

    def step(self, wait_s: float = 1.0) -> list[Finished]:
        """Finished requests; waits up to wait_s for the first one (no busy loop)."""
        out = []
        if self._pending == 0:
            return out
        try:
            got = [self._done.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while True:
            try:
                got.append(self._done.get_nowait())
            except queue.Empty:
                break
        now = [f for epoch, f in got if epoch == self._epoch]
        for f in now:
            if isinstance(f, Finished):
                self._calls.pop(f.request_id, None)
        for f in now:
            if isinstance(f, BaseException):
                self._pending -= len(now)
                raise f
        out = []
        for f in now:
            if f.error is None:
                self._succeeded += 1
                out += self._held + [f]  # the server answers others: the refusals held were the rows'
                self._held = []
            else:
                self._held.append(f)
        self._pending -= len(out)
        self._check_job_wide()
        if self._held and (len(self._held) >= JOB_WIDE_REFUSALS or len(self._held) == self._pending):
            released, self._held = self._held, []  # refusals with different messages: the rows'
            self._pending -= len(released)
            out += released
        return out

    def _check_job_wide(self) -> None:
        """Stop on refusals that are about the job, not the rows (see the module docstring)."""
        held = self._held
        if not held:
            return
        in_flight = self._pending - len(held)  # requests sent and not answered (held ones count as pending)
        if not self._succeeded and (len(held) >= JOB_WIDE_REFUSALS or in_flight == 0):
            what = f"refused all {len(held)} requests answered so far and completed none"
        elif len(held) >= JOB_WIDE_REFUSALS and len({f.error for f in held}) == 1:
            what = f"refused the last {len(held)} requests in a row, all with the same message"
        else:
            return
        raise EngineError(f"endpoint {self.base} {what} ({held[-1].error}): that is the job's settings or the "
                          f"server (e.g. LOGPROBS above its --max-logprobs), not the rows; no row was "
                          f"recorded as an error")

    def abort(self, request_ids: list[str]) -> None:
        """Cancel these requests where their HTTP call has not started; one that has cannot be
        recalled: the server finishes it and the pool drops the reply."""
        for rid in request_ids:
            call = self._calls.pop(rid, None)
            if call is not None and call.cancel():
                self._pending -= 1

    def abort_all(self) -> None:
        """Forget every request in flight (their replies, when they come, are dropped)."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.cancel()
        self._epoch += 1
        self._pending = 0
        self._held = []

    def close(self) -> None:
        self.http.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- one request --------------------------------------------------------------------------
    def _run_one(self, rid: str, path: str, body: dict, n_prompt: int, epoch: int = 0) -> None:
        t0 = time.time()
        try:
            reply, attempts = self.http.call("POST", path, body, n_prompt)
            f = self._parse(rid, reply, body)
            f.metadata.update(latency_s=round(time.time() - t0, 4), attempts=attempts)
        except RowError as e:
            f = Finished(rid, [], error=str(e), metadata={"latency_s": round(time.time() - t0, 4)})
        except EngineError as e:
            f = e
        except Exception as e:  # a reply we cannot read is the server's fault, not the row's
            f = EngineError(redact.redact(f"endpoint {self.base}: unreadable reply ({type(e).__name__}: {e})"))
        self._done.put((epoch, f))

    def _parse(self, rid: str, reply: dict, body: dict) -> Finished:
        k = self._logprobs_k
        samples = []
        for ch in sorted(reply.get("choices", []), key=lambda ch: ch.get("index", 0)):
            if "message" in ch:
                msg = ch.get("message") or {}
                text = msg.get("content") or ""
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            else:
                text, reasoning = ch.get("text") or "", ch.get("reasoning_content") or ch.get("reasoning")
            s = Sample(ch.get("index", 0), [], text.strip(), ch.get("finish_reason"), reasoning=reasoning)
            lp = ch.get("logprobs")
            if ch.get("token_ids") is not None:
                s.token_ids = list(ch["token_ids"])
            if k and lp:
                self._sample_logprobs(s, lp, k)
            samples.append(s)
        meta = {"usage": reply.get("usage")}
        prompt_lps = None
        if "prompt_logprobs" in body:
            ch = (reply.get("choices") or [{}])[0]
            raw = ch.get("prompt_logprobs", reply.get("prompt_logprobs"))
            if raw is None:
                raise EngineError(f"endpoint {self.base} returned no prompt_logprobs: scoring needs vLLM's "
                                  f"prompt_logprobs extension")
            prompt_lps = [None if d is None else
                          {int(t): Logprob(v["logprob"], v.get("rank")) for t, v in d.items()} for d in raw]
        return Finished(rid, samples, prompt_logprobs=prompt_lps, metadata=meta)

    @staticmethod
    def _sample_logprobs(s: Sample, lp: dict, k: int) -> None:
        """Completions ({tokens, token_logprobs, top_logprobs}) or chat ({content: [...]}) logprobs,
        with tokens as "token_id:N" (return_tokens_as_token_ids) -> Sample's three lists."""
        def tid(tok: str) -> int | None:
            return int(tok[9:]) if isinstance(tok, str) and tok.startswith("token_id:") else None

        if "content" in lp:  # chat
            entries = lp["content"] or []
            tokens = [e["token"] for e in entries]
            token_lps = [e["logprob"] for e in entries]
            tops = [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or []} for e in entries]
        else:
            tokens, token_lps, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        ids = [tid(t) for t in tokens]
        if any(i is None for i in ids):
            return  # the server does not give token ids: positions cannot be mapped to the vocabulary
        if not s.token_ids:
            s.token_ids = ids
        s.token_logprobs = list(token_lps)
        s.top_token_ids, s.top_logprobs = [], []
        for d in tops:
            ranked = sorted((d or {}).items(), key=lambda kv: -kv[1])[:k]
            s.top_token_ids.append([tid(t) for t, _ in ranked])
            s.top_logprobs.append([v for _, v in ranked])

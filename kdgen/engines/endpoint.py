"""The endpoint engine: the same streaming interface as VllmEngine, over an OpenAI-compatible server.

    --endpoint http://HOST:PORT/v1 --endpoint_api completions   # token-id prompts: the exact
                                                                # tokens the in-process engine gets
    --endpoint http://HOST:PORT/v1 --endpoint_api chat          # chat/completions with messages

`add_many` hands requests to a pool of CONCURRENCY threads (bounded concurrency: at most that many
HTTP requests in flight); `step()` waits briefly for results and returns the finished ones.
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff (MAX_RETRIES times,
then the engine reports an EngineError and the job stops keeping its finished chunks). 401/403/407
(credentials refused) and 404/405 (not the server or model we were told) are the server's answer
about us, not about a row: the job stops with one line that names the endpoint. Any other 4xx is
the row's fault and comes back as a per-row error (Finished.error, the server's message), unless
it is job-wide: refusals are held back until a request succeeds, and if none does before
JOB_WIDE_REFUSALS refusals (or before every request sent was refused), or if that many refusals
in a row carry the same message, the job stops (LOGPROBS above the server's --max-logprobs, a
sampling setting the server rejects). A row's own 400 (a prompt too long) among successes stays
that row's error record.

Credentials: ENDPOINT_API_KEY (or OPENAI_API_KEY) is sent as `Authorization: Bearer` on every
request, /v1/models included; without a key, `https://user:password@host/v1` sends HTTP basic auth.
The credentials are taken out of the URL before any request, so no URL we build, log or raise
carries them, and every message that leaves this module (error records included) goes through
kdgen.redact.
Replies are read with a size cap (reply_cap): a reply larger than the request can produce is the
server's fault and stops the job (EngineError), it is never held in memory whole.
Per-request latency, usage and attempts go into Finished.metadata; reasoning text
(`reasoning_content` / `reasoning`) into Sample.reasoning.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import requests
import requests.auth

from kdgen import redact
from kdgen.config import JobConfig
from kdgen.engines.base import EngineError, EngineRequest, Finished, Logprob, Sample
from kdgen.retry import Policy

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
REFUSED_STATUS = {401, 403, 407}  # our credentials were refused: stop, never the row's fault
WRONG_SERVER_STATUS = {404, 405}  # no such path or model there: stop, never the row's fault
# A 4xx on each of the first this-many requests with none succeeding, or on this many in a row with
# the same message, is the server's answer about the job's settings, not about the rows.
JOB_WIDE_REFUSALS = 8
MODELS_REPLY_CAP = 4 << 20  # GET /models: a list of model cards
ERROR_REPLY_CAP = 64 << 10  # a 4xx/5xx body: only its first 500 characters are ever shown
REPLY_BASE_BYTES = 1 << 20  # any completion reply may be this large ...
REPLY_BYTES_PER_POSITION = 512  # ... plus this per token position, times (1 + logprobs per position)


class RowError(Exception):
    """The server refused this request (4xx): the row is recorded as an error, the job goes on."""


def retry_policy(max_retries: int) -> Policy:
    """MAX_RETRIES retries after the first try; waits of 0.5, 1, 2, 4, ... seconds (capped at 10),
    with +-25 % jitter so retries do not align."""
    return Policy(attempts=max_retries + 1, base_delay_s=BACKOFF_BASE_S, max_delay_s=BACKOFF_MAX_S, jitter=0.25)


class ServerTrouble(Exception):
    """A try that failed in a way worth retrying (connection, timeout, 5xx, 408/409/425/429, a
    reply that is not JSON); the message is the last reason shown once retries are spent."""


class BearerAuth(requests.auth.AuthBase):
    """`Authorization: Bearer KEY` on every request. An auth object rather than a session header,
    so that requests drops it on a redirect to another host and ~/.netrc cannot replace it."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self.key}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(***)"


class ReplyTooLarge(Exception):
    """The reply is larger than the cap for its request."""


def reply_cap(body: dict | None, n_prompt: int = 0) -> int:
    """Bytes a reply to this request can reasonably take: generous, derived from what it can
    produce (samples x max_tokens positions, the prompt's token ids and prompt logprobs), each
    position with its top-k logprobs. Anything larger is not a reply to this request."""
    if body is None:
        return MODELS_REPLY_CAP
    logprobs = body.get("logprobs")  # completions: k; chat: True, with k in top_logprobs
    k = max(logprobs if type(logprobs) is int else 0, body.get("top_logprobs") or 0, body.get("prompt_logprobs") or 0)
    positions = int(body.get("n") or 1) * int(body.get("max_tokens") or 0) + n_prompt
    return REPLY_BASE_BYTES + positions * REPLY_BYTES_PER_POSITION * (1 + k)


def read_capped(resp: requests.Response, cap: int, truncate: bool = False) -> bytes:
    """A streamed reply's body (decompressed), at most `cap` bytes: over the cap raise
    ReplyTooLarge, or with truncate return the first `cap` bytes."""
    declared = resp.headers.get("Content-Length", "")
    if not truncate and declared.isdigit() and int(declared) > cap:
        resp.close()
        raise ReplyTooLarge(f"{declared} bytes (Content-Length)")
    buf = bytearray()
    for piece in resp.iter_content(64 << 10):
        buf += piece
        if len(buf) > cap:
            resp.close()
            if not truncate:
                raise ReplyTooLarge(f"more than {cap} bytes")
            del buf[cap:]
            break
    return bytes(buf)


def server_message(resp: requests.Response, body: bytes) -> str:
    """One line for a refused request: status, URL and the server's message (body as read by
    read_capped), redacted."""
    text = body.decode("utf-8", errors="replace")
    try:
        reply = json.loads(text)
        err = reply.get("error", reply) if isinstance(reply, dict) else reply
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = text
    # Redact first: a cut could split a secret the server echoed, leaving a piece no pattern knows.
    return redact.redact(f"HTTP {resp.status_code} from {resp.url}: {redact.redact(str(msg))[:500]}")


class EndpointEngine:
    """Streaming add/step over an OpenAI-compatible HTTP server (vLLM, SGLang, ...)."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self, c: JobConfig):
        creds = redact.url_credentials(c.endpoint)
        self.base = (creds[2] if creds else c.endpoint).rstrip("/")  # never holds user:password
        if c.endpoint_api_key:
            self._auth, self.auth_kind = BearerAuth(c.endpoint_api_key), "API key"
        elif creds:
            self._auth = requests.auth.HTTPBasicAuth(creds[0], creds[1])
            self.auth_kind = "user:password of --endpoint"
        else:
            self._auth, self.auth_kind = None, ""
        self.api = c.endpoint_api
        self.timeout = (min(30.0, c.request_timeout_s), c.request_timeout_s)
        self.max_retries = c.max_retries
        self._local = threading.local()
        self._closed = threading.Event()
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
                 self.base, self.model, self.max_model_len, self.api, c.concurrency, self.auth_kind or "none")

    # ---- HTTP ---------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.auth = self._auth
        return s

    def _refused(self, status: int, method: str, path: str) -> str:
        """The one line for 401/403/407: which endpoint, which request, which credential (never
        its value)."""
        what = f"HTTP {status} on {method} {path}"
        if not self.auth_kind:
            return (f"endpoint {self.base} wants credentials ({what}) and none were given: "
                    f"set ENDPOINT_API_KEY (or OPENAI_API_KEY)")
        return (f"endpoint {self.base} refused the {self.auth_kind} ({what}): "
                f"set ENDPOINT_API_KEY (or OPENAI_API_KEY) to a key this server accepts")

    def _call(self, method: str, path: str, body: dict | None = None, n_prompt: int = 0) -> tuple[dict, int]:
        """One request with retries (retry_policy); returns (JSON reply, attempts). Raises RowError
        on a 4xx that is the row's fault, EngineError on refused credentials, a wrong URL or model
        (401, 403, 407, 404, 405), a reply over its size cap and when retries are exhausted."""
        tries = []

        def attempt() -> dict:
            if self._closed.is_set():
                raise EngineError("endpoint engine closed")
            tries.append(1)
            return self._try(method, path, body, n_prompt)

        policy = retry_policy(self.max_retries)
        try:
            return policy.call(attempt, f"{method} {self.base + path}", lambda e: isinstance(e, ServerTrouble)), len(tries)
        except ServerTrouble as e:
            raise EngineError(f"endpoint {self.base} unreachable after {policy.attempts} attempts "
                              f"(MAX_RETRIES={self.max_retries}): {e}") from None

    def _try(self, method: str, path: str, body: dict | None, n_prompt: int) -> dict:
        """One HTTP request: the JSON reply, or ServerTrouble / RowError / EngineError."""
        url = self.base + path
        cap = reply_cap(body, n_prompt)
        try:
            resp = self._session().request(method, url, json=body, timeout=self.timeout, stream=True)
            body_bytes = read_capped(resp, cap if resp.status_code < 300 else ERROR_REPLY_CAP,
                                     truncate=resp.status_code >= 300)
        except ReplyTooLarge as e:
            raise EngineError(f"endpoint {self.base}: the reply to {method} {path} is too large ({e}; the cap "
                              f"for this request is {cap} bytes): is --endpoint an OpenAI-compatible "
                              f"server such as vllm serve?") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise ServerTrouble(redact.redact(f"{type(e).__name__}: {str(e)[:300]}")) from None
        except requests.RequestException as e:  # a bad URL, too many redirects, ...: not transient
            raise EngineError(redact.redact(f"endpoint {self.base}: {method} {path} failed: "
                                            f"{type(e).__name__}: {str(e)[:300]}")) from None
        if resp.status_code < 300:
            try:
                return json.loads(body_bytes)
            except ValueError:
                text = body_bytes.decode("utf-8", errors="replace")
                raise ServerTrouble(f"HTTP {resp.status_code} from {url}: reply is not JSON: "
                                    f"{redact.redact(text)[:200]!r}") from None
        if resp.status_code >= 500 or resp.status_code in RETRY_STATUS:
            raise ServerTrouble(server_message(resp, body_bytes))
        if resp.status_code in REFUSED_STATUS:
            raise EngineError(self._refused(resp.status_code, method, path))
        if resp.status_code in WRONG_SERVER_STATUS:
            raise EngineError(f"endpoint {self.base}: {server_message(resp, body_bytes)}: is --endpoint the "
                              f"server's /v1 base URL, serving MODEL_PATH's model?")
        raise RowError(server_message(resp, body_bytes))

    def _discover(self, c: JobConfig) -> tuple[str, int]:
        """The served model (from /v1/models) and its context length."""
        try:
            reply, _ = self._call("GET", "/models")
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
        self._closed.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- one request --------------------------------------------------------------------------
    def _run_one(self, rid: str, path: str, body: dict, n_prompt: int, epoch: int = 0) -> None:
        t0 = time.time()
        try:
            reply, attempts = self._call("POST", path, body, n_prompt)
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

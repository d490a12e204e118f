"""HTTP transport of the endpoint engine: JSON requests to an OpenAI-compatible server, retried.

Connection errors, timeouts, 408/409/425/429 and 5xx are retried (kdgen.retry, MAX_RETRIES times,
backoff 0.5..10 s), then EngineError. 401/403/407 (credentials refused) and 404/405 (not the server
or model we were told) stop the job with one line naming the endpoint; any other 4xx is RowError.
Credentials: ENDPOINT_API_KEY (or OPENAI_API_KEY) goes as `Authorization: Bearer`, else the URL's
user:password as basic auth; they are taken out of the URL first, so no URL built, logged or raised
carries them, and every message leaving here goes through kdgen.redact. Replies are read with a size
cap (reply_cap): a larger one is the server's fault (EngineError), never held in memory whole.
"""

from __future__ import annotations

import json
import threading

import requests
import requests.auth

from kdgen import redact
from kdgen.engines.base import EngineError
from kdgen.retry import Policy

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
REFUSED_STATUS = {401, 403, 407}  # our credentials were refused: stop, never the row's fault
WRONG_SERVER_STATUS = {404, 405}  # no such path or model there: stop, never the row's fault
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


class HttpClient:
    """JSON requests to one server's base URL, each retried by retry_policy; safe to call from many
    threads (one requests.Session each)."""

    def __init__(self, endpoint: str, api_key: str, request_timeout_s: float, max_retries: int):
        creds = redact.url_credentials(endpoint)
        self.base = (creds[2] if creds else endpoint).rstrip("/")  # never holds user:password
        if api_key:
            self.auth, self.auth_kind = BearerAuth(api_key), "API key"
        elif creds:
            self.auth = requests.auth.HTTPBasicAuth(creds[0], creds[1])
            self.auth_kind = "user:password of --endpoint"
        else:
            self.auth, self.auth_kind = None, ""
        self.timeout = (min(30.0, request_timeout_s), request_timeout_s)
        self.max_retries = max_retries
        self._local = threading.local()
        self._closed = threading.Event()

    def close(self) -> None:
        """Calls from now on fail (EngineError) instead of trying again."""
        self._closed.set()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.auth = self.auth
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

    def call(self, method: str, path: str, body: dict | None = None, n_prompt: int = 0) -> tuple[dict, int]:
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

"""One redaction function for everything kdgen shows or writes about its settings and errors.

Secret values are registered when a JobConfig holding them is built (config.py marks the secret
knobs in their field metadata); `redact(text)` replaces every registered value with `***`, and
also anything that looks like a credential whatever its source: the user:password part of a URL,
`Bearer ...`/`Basic ...` tokens, and key/token/signature query parameters. The settings block,
`kdgen status`, the CLI's error line and every log line (a filter on the log handlers, which also
covers tracebacks and third-party loggers) go through it.

No kdgen imports here: every module may use it.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"

_lock = threading.Lock()
_values: set[str] = set()

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic)\s+)?[^'\"\s,}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|sig|signature|password)=)[^&#\s\"']+")


def register(value: str) -> None:
    """Mask this value wherever it appears from now on (in this process)."""
    if value:
        with _lock:
            _values.add(value)


def redact(text: str) -> str:
    """`text` with every credential replaced by ***."""
    if not isinstance(text, str):
        text = str(text)
    text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
    text = _AUTH_HEADER.sub(r"\1" + MASK, text)
    text = _BEARER.sub(r"\1" + MASK, text)
    text = _QUERY_SECRET.sub(r"\1" + MASK, text)
    with _lock:
        values = sorted(_values, key=len, reverse=True)  # a longer secret may contain a shorter one
    for v in values:
        if v in text:
            text = text.replace(v, MASK)
    return text


def url_credentials(url: str) -> tuple[str, str, str] | None:
    """(user, password, url without them) if the URL embeds user[:password]@, else None."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return unquote(user), unquote(password), urlunsplit(parts._replace(netloc=hostport))


class RedactingFilter(logging.Filter):
    """Redacts a record's message and traceback before any handler formats it."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show it as given
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of `logger` (default: the root logger): handler filters
    also see the records of child loggers (urllib3, vLLM, ...), logger filters would not."""
    logger = logger or logging.getLogger()
    for h in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())

"""One redaction function for everything kdgen shows or writes about its settings and errors.

Secret values are registered when a JobConfig holding them is built; `redact(text)` masks them
(and the forms a server may echo them in) as `***`, plus anything that looks like a credential
whatever its source (URL userinfo, `Authorization:`, bearer tokens, `api_key=` fields). Redact
before truncating. What is covered, and its tests: docs/credentials.md.
No kdgen imports here: every module may use it.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"

_lock = threading.Lock()
_values: set[str] = set()

# scheme://user:password@ up to the LAST @ before the host (a password may hold a raw @).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#\"'<>]+@")
_AUTH_HEADER = re.compile(
    r"(?i)((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic|token|digest)\s+)?[^'\"\s,}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_BASIC = re.compile(r"(?i)\b(basic\s+)([A-Za-z0-9+/]{4,}={0,2})")  # masked if it decodes to user:password
_QUERY_SECRET = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access_token|sig|signature|password)=)[^&#\s\"']+")
# A named secret field in JSON, a Python repr, a header or a form: "api_key": "...", password=...
_FIELD_SECRET = re.compile(
    r"(?i)(\b(?:x-)?(?:api[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|id[_-]?token|"
    r"client[_-]?secret|secret[_-]?key|password|passwd)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,&;}]+")


def register(value: str) -> None:
    """Mask this value wherever it appears from now on (in this process), also base64- or
    percent-encoded (how a server that echoes a request would show it)."""
    if value:
        with _lock:
            _values.update(encoded_forms(value))


def register_basic_auth(user: str, password: str) -> None:
    """Mask HTTP basic auth for user:password: the password and the header's base64 token."""
    register(password)
    if password:
        register(f"{user}:{password}")


def encoded_forms(value: str) -> set[str]:
    """value, its base64 (standard, url-safe, unpadded) and percent-encoded forms."""
    import base64
    from urllib.parse import quote

    raw = value.encode()
    forms = {value, quote(value, safe=""), quote(value)}
    for enc in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms.update({enc, enc.rstrip("=")})
    return {f for f in forms if f}


def url_passwords(text: str) -> list[str]:
    """The passwords of every scheme://user:password@ in text (a comma-separated list included)."""
    out = []
    for m in _URL_USERINFO.finditer(text):
        creds = url_credentials(m.group(0) + "host")
        if creds and creds[1]:
            out.append(creds[1])
    return out


def redact(text: str) -> str:
    """`text` with every credential replaced by ***."""
    if not isinstance(text, str):
        text = str(text)
    text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
    text = _AUTH_HEADER.sub(r"\1" + MASK, text)
    text = _BEARER.sub(r"\1" + MASK, text)
    text = _BASIC.sub(_mask_basic, text)
    text = _QUERY_SECRET.sub(r"\1" + MASK, text)
    text = _FIELD_SECRET.sub(r"\1" + MASK, text)
    with _lock:
        values = sorted(_values, key=len, reverse=True)  # a longer secret may contain a shorter one
    for v in values:
        if v in text:
            text = text.replace(v, MASK)
    return text


def _mask_basic(m: re.Match) -> str:
    """`Basic TOKEN` with TOKEN masked when it is base64 of user:password (not English prose)."""
    import base64
    import binascii

    try:
        decoded = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        return m.group(0)
    return m.group(1) + MASK if b":" in decoded else m.group(0)


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

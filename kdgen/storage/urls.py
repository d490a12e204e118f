"""URLs: every path is a local path, file://... or gs://bucket/key (gcs:// too)."""

from __future__ import annotations

import os

REMOTE_SCHEMES = ("gs", "gcs")


def scheme(url: str) -> str:
    """The URL's scheme in lower case; "file" for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_remote(url: str) -> bool:
    return scheme(url) != "file"


def local_path(url: str) -> str:
    """The file system path of a local URL (file:// taken off)."""
    return url[len("file://"):] if url.startswith("file://") else url


def check_scheme(url: str) -> str:
    """The scheme, if we can store there; else ValueError naming the URL."""
    s = scheme(url)
    if s not in ("file",) + REMOTE_SCHEMES:
        raise ValueError(f"{url}: unsupported URL scheme {s!r}; use a local path, file:// or gs://")
    return s


def bucket_key(url: str) -> tuple[str, str]:
    """(bucket, object name) of a gs:// URL."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if not is_remote(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out += "/" + p
    return out


def has_magic(s: str) -> bool:
    """True if s is a glob pattern."""
    return any(c in s for c in "*?[")


def check_plain_name(name, where: str) -> str:
    """`name` if it is a plain object name (no separator, not `.` or `..`, not absolute, no NUL);
    else ValueError naming `where` (the manifest or listing it came from)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ValueError(f"{where}: {name!r} is not a plain file name")
    return name

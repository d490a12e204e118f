"""Local paths and gs:// URLs through fsspec (gcsfs), without importing kdgen."""

from __future__ import annotations

import os

# gcsfs >= 2026.3 probes gRPC on every call unless this is set before it is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

_FS: dict = {}


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it). gs:// honours STORAGE_EMULATOR_HOST (tests, emulators)."""
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    scheme, rest = url.split("://", 1)
    if scheme not in ("gs", "gcs"):
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path or gs://")
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if key not in _FS:
        import gcsfs

        cls = getattr(gcsfs, "GCSFileSystem")
        endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
        kw = dict(use_listings_cache=False, skip_instance_cache=True)
        if endpoint:
            kw.update(endpoint_url=endpoint if "://" in endpoint else "http://" + endpoint, token="anon")
        _FS[key] = cls(**kw)
    return _FS[key], rest


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(base), *parts)

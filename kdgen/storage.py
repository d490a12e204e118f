"""Every path is a URL: a local path, file://... or gs://bucket/key.

The only module that knows object-store tricks:
- write_bytes: atomic replace (local: temp + fsync + os.replace; gs: one upload request).
- open_input: a corpus file for reading, pinned to the version planned (gs: ranged reads of that
  generation; local: the size and mtime checked on the open file).
- create_if_absent: gs upload with ifGenerationMatch=0; local: a complete, fsynced temp file
  linked into place with link(2) (atomic, fails if the name exists); where the file system has
  no hard links (EPERM/ENOTSUP/ENOSYS, e.g. FUSE mounts), renameat2(RENAME_NOREPLACE); where it
  has neither, rename(2) under the directory's flock (exclusive among the processes that share
  this mount only). A reader never sees a partial object.
- replace_if_generation: compare-and-swap (local: directory flock + stat; gs: ifGenerationMatch).
- list_names: fresh listing (no listing cache).
gcsfs retries 5xx and timeouts, also for conditional writes: a create whose reply was lost
comes back as 412. Every conditional upload carries a random write id in the object's custom
metadata; a 412 is followed by a metadata read-back, and our own id means the write was ours.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import glob as globmod
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar
from urllib.parse import quote

# Before gcsfs is imported: otherwise every call probes gRPC (45-75 s against an emulator).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_SCHEMES = ("gs", "gcs")
TMP_MARK = ".kdgen-tmp-"  # local temp files; hidden from list_names
LOCK_NAME = ".kdgen.lock"  # local per-directory lock for compare-and-swap; hidden from list_names
RETRY_ATTEMPTS = int(os.environ.get("KDGEN_STORAGE_RETRIES", "4"))
RETRY_BASE_DELAY_S = float(os.environ.get("KDGEN_STORAGE_RETRY_DELAY_S", "1.0"))
# The most seconds one storage operation may take, retries included (gcsfs retries inside each
# of our attempts too: a read of an object that answers 503 would otherwise block for minutes).
# Set from --storage_deadline_s by configure().
DEADLINE_S = float(os.environ.get("STORAGE_DEADLINE_S") or 300.0)
INPUT_BLOCK = 4 << 20  # bytes fetched per ranged read of an input file (read-ahead)


class StorageError(OSError):
    """A storage operation failed after retries; the message names the operation and the URL."""


class InputChanged(ValueError):
    """A corpus file is not the version the job planned (rewritten, replaced, deleted)."""


def configure(deadline_s: float | None = None) -> None:
    """Process-wide storage settings (from the job's config)."""
    global DEADLINE_S
    if deadline_s is not None:
        if deadline_s <= 0:
            raise ValueError(f"storage deadline must be positive, got {deadline_s}")
        DEADLINE_S = float(deadline_s)


@dataclass(frozen=True)
class Stat:
    generation: str  # changes on every write of the object
    size: int
    mtime: float | None


# ---------------------------------------------------------------- URLs and filesystems

def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_remote(url: str) -> bool:
    return _scheme(url) != "file"


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _check_scheme(url: str) -> str:
    s = _scheme(url)
    if s not in ("file",) + REMOTE_SCHEMES:
        raise ValueError(f"{url}: unsupported URL scheme {s!r}; use a local path, file:// or gs://")
    return s


def _bucket_key(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


_fs_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_fs_lock = threading.Lock()


def _gcs_fs():
    endpoint = os.environ.get("KDGEN_GCS_ENDPOINT") or os.environ.get("STORAGE_EMULATOR_HOST") or None
    if endpoint and endpoint != "default" and "://" not in endpoint:
        endpoint = "http://" + endpoint
    key = ("gs", os.getpid(), endpoint)  # a forked child must not reuse the parent's session
    with _fs_lock:
        fs = _fs_cache.get(key)
        if fs is None:
            import aiohttp
            import gcsfs

            cls = gcsfs.GCSFileSystem
            if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() != "true":
                cls = gcsfs.core.GCSFileSystem
            kw = {}
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                kw["token"] = "anon"
            fs = cls(
                endpoint_url=endpoint if endpoint != "default" else None,
                use_listings_cache=False,
                skip_instance_cache=True,
                requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300),
                **kw,
            )
            _fs_cache[key] = fs
        return fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it): local -> (LocalFileSystem, path); gs -> (GCSFileSystem, bucket/key)."""
    s = _check_scheme(url)
    if s == "file":
        return fsspec.filesystem("file"), _local(url)
    return _gcs_fs(), url.split("://", 1)[1]


def join(base: str, *parts: str) -> str:
    if not is_remote(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out += "/" + p
    return out


def _dirname(path: str) -> str:
    return os.path.dirname(path) or "."


# ---------------------------------------------------------------- errors and retries

def _http_code(e: BaseException) -> int | None:
    code = getattr(e, "code", None) or getattr(e, "status", None)
    try:
        return int(code) if code is not None else None
    except (TypeError, ValueError):
        return None


def is_transient(e: BaseException) -> bool:
    """True for errors worth retrying: 5xx, 408, 429, timeouts, dropped connections."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, ValueError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    code = _http_code(e)
    if code is not None:
        return code >= 500 or code in (408, 429)
    mod = type(e).__module__ or ""
    return mod.startswith(("aiohttp", "requests", "urllib3")) or type(e).__name__ in ("ChecksumError",)


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    name = type(e).__name__
    return f"{name}: {msg}"[:300] if msg else name


_attempt = threading.local()  # .deadline: time.monotonic() by which the current attempt must end


def remaining_s() -> float | None:
    """Seconds left for the storage call in progress on this thread (None outside retry())."""
    d = getattr(_attempt, "deadline", None)
    return None if d is None else max(d - time.monotonic(), 0.001)


def retry(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None,
          max_delay: float = 30.0, retriable: Callable[[BaseException], bool] = is_transient,
          deadline_s: float | None = None) -> T:
    """Call fn(); on a transient error sleep base_delay * 2**i (x jitter 0.5-1.5) and try again,
    at most `attempts` times and never past `deadline_s` seconds (default DEADLINE_S) in all.
    Reads inside fn bound their own wait by remaining_s()."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    base_delay = RETRY_BASE_DELAY_S if base_delay is None else base_delay
    budget = DEADLINE_S if deadline_s is None else deadline_s
    t0 = time.monotonic()
    deadline = t0 + budget
    outer = getattr(_attempt, "deadline", None)
    _attempt.deadline = deadline if outer is None else min(deadline, outer)
    try:
        for i in range(attempts):
            try:
                return fn()
            except Exception as e:
                left = deadline - time.monotonic()
                if not retriable(e):
                    raise
                if i == attempts - 1 or left <= 0.05:
                    if left <= 0.05:
                        raise StorageError(f"{what}: no success within the storage deadline of {budget:g} s "
                                           f"(STORAGE_DEADLINE_S); last error {_reason(e)}") from e
                    raise
                delay = min(max_delay, base_delay * 2 ** i, left / 2) * (0.5 + random.random())
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, _reason(e), i + 1, attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        _attempt.deadline = outer


@contextlib.contextmanager
def _errors(op: str, url: str):
    """FileNotFoundError stays; anything else becomes one-line StorageError(f"{op} {url}: {reason}")."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:
        raise StorageError(f"{op} {url}: {_reason(e)}") from e


def _idempotent(op: str, url: str, fn: Callable[[], T]) -> T:
    with _errors(op, url):
        return retry(fn, f"{op} {url}")


# ---------------------------------------------------------------- GCS requests

WRITE_ID = "kdgen-write-id"  # custom metadata: which call wrote this generation (for read-back)


def _gcs_upload(url: str, data: bytes, if_generation_match: str | None = None, write_id: str = "") -> dict:
    """One multipart upload request (atomic: the object appears whole or not at all).

    Returns the object resource. A failed precondition raises FileExistsError (HTTP 412).
    write_id goes into the object's custom metadata; gcsfs's retries resend the same one.
    """
    fs = _gcs_fs()
    bucket, key = _bucket_key(url)
    resource = {"name": key}
    if write_id:
        resource["metadata"] = {WRITE_ID: write_id}
    meta = json.dumps(resource).encode()
    boundary = "==kdgen-" + uuid.uuid4().hex + "=="
    body = b"".join([
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(), meta,
        f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(), data,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    kw = {} if if_generation_match is None else {"ifGenerationMatch": str(if_generation_match)}
    return fs.call(
        "POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
        uploadType="multipart", headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
        data=body, json_out=True, **kw)


def _gcs_object(url: str) -> dict:
    fs = _gcs_fs()
    bucket, key = _bucket_key(url)
    if not key:
        raise FileNotFoundError(url)
    return fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True, timeout=remaining_s())


def _gcs_stat(o: dict) -> Stat:
    return Stat(str(o["generation"]), int(o.get("size", 0)), _parse_time(o.get("updated")))


def _parse_time(s: str | None) -> float | None:
    if not s:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---------------------------------------------------------------- local helpers

def _tmp_path(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _write_tmp(path: str, data: bytes, mtime_ns: int | None = None) -> str:
    os.makedirs(_dirname(path), exist_ok=True)
    tmp = _tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # An explicit, fine-grained mtime makes the local generation change on every write
        # (the file system's own timestamps are tick-coarse and inode numbers get reused).
        t = mtime_ns if mtime_ns is not None else time.time_ns()
        os.utime(tmp, ns=(t, t))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
_warned_dirs: set[tuple[str, str]] = set()


def _warn_once(path: str, how: str, msg: str) -> None:
    key = (_dirname(path), how)
    if key not in _warned_dirs:
        _warned_dirs.add(key)
        log.warning("%s: %s", _dirname(path), msg)


def _renameat2_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError if dst exists (Linux renameat2 RENAME_NOREPLACE).
    OSError(ENOSYS/EINVAL/...) where the kernel, libc or file system cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not in this libc")
    at_fdcwd, rename_noreplace = -100, 1
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) != 0:
        err = ctypes.get_errno()
        raise FileExistsError(err, os.strerror(err), dst) if err == errno.EEXIST else OSError(err, os.strerror(err), dst)


def _create_without_link(tmp: str, path: str) -> Stat | None:
    """Create-if-absent of a complete temp file where link(2) is not available."""
    st = _local_stat(os.stat(tmp))  # rename keeps the inode, size and mtime: the same generation
    try:
        _renameat2_noreplace(tmp, path)
        _warn_once(path, "noreplace", "no hard links on this file system: creating objects with renameat2(NOREPLACE)")
        return st
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
    _warn_once(path, "flock", "no hard links and no renameat2(NOREPLACE) on this file system: create-if-absent "
                              "holds only among the processes of this machine (several hosts: use gs:// directly)")
    with _dir_lock(path):
        if os.path.lexists(path):
            return None
        os.rename(tmp, path)
        return st


def local_fs_type(url: str) -> str:
    """The file system type of the mount that holds a local path (from /proc/mounts), '' if unknown."""
    path = os.path.abspath(_local(url))
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, fstype = mnt, parts[2]
    except OSError:
        return ""
    return fstype


def _local_generation(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_ino}-{st.st_size}"


def _local_stat(st: os.stat_result) -> Stat:
    return Stat(_local_generation(st), st.st_size, st.st_mtime)


@contextlib.contextmanager
def _dir_lock(path: str):
    d = _dirname(path)
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- the API

def exists(url: str) -> bool:
    """True if an object (gs) or a file or directory (local) exists at url."""
    return stat(url) is not None if is_remote(url) else os.path.exists(_local(url))


def stat(url: str) -> Stat | None:
    """Generation, size and mtime of the object at url; None if there is none."""
    if _check_scheme(url) == "file":
        try:
            st = os.stat(_local(url))
        except FileNotFoundError:
            return None
        return _local_stat(st)
    try:
        return _gcs_stat(_idempotent("stat", url, lambda: _gcs_object(url)))
    except FileNotFoundError:
        return None


def read_bytes(url: str) -> bytes:
    if _check_scheme(url) == "file":
        with _errors("read", url), open(_local(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url)
    return _idempotent("read", url, lambda: fs.cat_file(path, timeout=remaining_s()))


def check_plain_name(name, where: str) -> str:
    """`name` if it is a plain object name (no separator, not `.` or `..`, not absolute, no NUL);
    else ValueError naming `where` (the manifest or listing it came from)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ValueError(f"{where}: {name!r} is not a plain file name")
    return name


def read_json(url: str) -> dict:
    """The JSON object stored at url. ValueError naming the object if it is not one (a torn or
    foreign object); FileNotFoundError if there is none."""
    data = read_bytes(url)
    try:
        body = json.loads(data)
    except ValueError as e:  # also UnicodeDecodeError
        raise ValueError(f"{url}: not JSON ({str(e)[:120]})") from None
    if not isinstance(body, dict):
        raise ValueError(f"{url}: holds a JSON {type(body).__name__}, not an object")
    return body


def write_bytes(url: str, data: bytes) -> None:
    """Create or overwrite atomically: a reader sees the old object or the new one, never a part."""
    if _check_scheme(url) == "file":
        path = _local(url)
        with _errors("write", url):
            tmp = _write_tmp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return
    _idempotent("write", url, lambda: _gcs_upload(url, data))


def create_if_absent(url: str, data: bytes) -> bool:
    """Create the object only if none exists; True iff this call created it.

    On GCS a retried create whose first reply was lost sees its own object (412): a write id
    in the object's metadata tells this call's own write from another writer's, even when the
    bytes are identical.
    """
    return create_if_absent_stat(url, data) is not None


def replace_if_generation(url: str, data: bytes, generation: str) -> bool:
    """Compare-and-swap: write data only if the object is still at `generation`.

    True iff this call's data replaced it. On GCS a 412 is followed by a read-back of the
    object's write id (a retried request whose first attempt had succeeded counts as ours).
    """
    return replace_if_generation_stat(url, data, generation) is not None


def create_if_absent_stat(url: str, data: bytes) -> Stat | None:
    """create_if_absent that returns the new object's Stat (its generation) instead of True."""
    if _check_scheme(url) == "file":
        path = _local(url)
        with _errors("create", url):
            tmp = _write_tmp(path, data)  # complete and fsynced before it gets its name
            try:
                os.link(tmp, path)  # atomic, fails if path exists
                return _local_stat(os.stat(tmp))  # same inode as path, and tmp is ours alone
            except FileExistsError:
                return None
            except OSError as e:
                if e.errno not in NO_HARD_LINKS:
                    raise
                return _create_without_link(tmp, path)  # e.g. gcsfuse answers ENOSYS
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    return _gcs_conditional("create", url, data, "0")


def replace_if_generation_stat(url: str, data: bytes, generation: str) -> Stat | None:
    """replace_if_generation that returns the new object's Stat instead of True."""
    if _check_scheme(url) == "file":
        path = _local(url)
        with _errors("replace", url), _dir_lock(path):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            if _local_generation(st) != generation:
                return None
            tmp = _write_tmp(path, data, mtime_ns=max(time.time_ns(), st.st_mtime_ns + 1))
            try:
                new = _local_stat(os.stat(tmp))
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return new
    return _gcs_conditional("replace", url, data, str(generation))


def _gcs_conditional(op: str, url: str, data: bytes, generation: str) -> Stat | None:
    """Upload if the object is at `generation` ("0": absent). One write id for every attempt, so
    any retry (gcsfs's or ours) that meets a 412 can tell its own earlier success by read-back."""
    wid = uuid.uuid4().hex

    def attempt() -> Stat | None:
        try:
            return _gcs_stat(_gcs_upload(url, data, if_generation_match=generation, write_id=wid))
        except FileNotFoundError:  # replace of a missing object
            return None
        except FileExistsError:  # 412: someone else's generation, or our own earlier attempt
            return _gcs_readback(url, data, wid)

    with _errors(op, url):
        return retry(attempt, f"{op} {url}")


def _gcs_readback(url: str, data: bytes, write_id: str) -> Stat | None:
    """After a 412: is the stored object this call's own write (a retried request that had succeeded)?

    Decided by the write id in the object's metadata; objects without one (written by other
    tools) are compared by content.
    """
    try:
        o = _idempotent("read-back", url, lambda: _gcs_object(url))
    except FileNotFoundError:  # deleted since: not ours now
        return None
    stored_id = (o.get("metadata") or {}).get(WRITE_ID)
    if stored_id is not None:
        return _gcs_stat(o) if stored_id == write_id else None
    if int(o.get("size", -1)) != len(data):
        return None
    if o.get("md5Hash"):
        same = o["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    else:  # composite objects carry no md5: compare the bytes of that very generation
        fs = _gcs_fs()
        bucket, key = _bucket_key(url)
        try:
            _, body = _idempotent("read-back", url, lambda: fs.call(
                "GET", f"{fs._location}/download/storage/v1/b/{{}}/o/{{}}", bucket, key,
                alt="media", generation=str(o["generation"])))
        except FileNotFoundError:
            return None
        same = body == data
    return _gcs_stat(o) if same else None


def delete(url: str, if_generation: str | None = None, check_first: bool = True) -> None:
    """Delete the object; a missing one is fine.

    With if_generation, delete only while the object is at that generation (local: under the
    directory lock; gs: the precondition is sent, which real GCS enforces and fake-gcs-server
    ignores, so by default the generation is also checked with a stat first: two requests).
    check_first=False sends the one conditional DELETE: for callers to whom deleting a newer
    generation would do no harm where the precondition is not enforced.
    """
    if _check_scheme(url) == "file":
        path = _local(url)
        with _errors("delete", url):
            lock = _dir_lock(path) if if_generation is not None else contextlib.nullcontext()
            with lock, contextlib.suppress(FileNotFoundError):
                if if_generation is not None and _local_generation(os.stat(path)) != if_generation:
                    return
                os.unlink(path)
        return
    fs = _gcs_fs()
    bucket, key = _bucket_key(url)
    kw = {}
    if if_generation is not None:
        if check_first:
            st = stat(url)
            if st is None or st.generation != if_generation:
                return
        kw["ifGenerationMatch"] = str(if_generation)

    def rm():
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, **kw)
        except (FileNotFoundError, FileExistsError):  # gone, or changed since (412): leave it
            pass

    _idempotent("delete", url, rm)


def list_names(dir_url: str) -> list[str]:
    """Sorted basenames of the objects directly under dir_url; [] if there are none. Never cached.
    On gs:// one request per 1,000 objects."""
    return sorted(list_stats(dir_url, stats=False))


def list_stats(dir_url: str, stats: bool = True) -> dict[str, Stat | None]:
    """{basename: Stat} of the objects directly under dir_url (with stats=False the values are
    None, and local listings skip the per-file stat). Never cached; on gs:// one request per
    1,000 objects, generations included."""
    if _check_scheme(dir_url) == "file":
        path = _local(dir_url)
        with _errors("list", dir_url):
            try:
                it = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                return {}
            out: dict[str, Stat | None] = {}
            with it:
                for e in it:
                    if TMP_MARK in e.name or e.name == LOCK_NAME:
                        continue
                    try:
                        if not e.is_file():
                            continue
                        out[e.name] = _local_stat(e.stat()) if stats else None
                    except FileNotFoundError:  # deleted while we listed
                        continue
            return out
    fs, path = filesystem(dir_url)
    path = path.rstrip("/")

    def ls():
        try:
            entries = fs.ls(path, detail=True, refresh=True, timeout=remaining_s())
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            if e.get("type") != "file":
                continue
            name = e["name"].rstrip("/")
            if name == path:  # a "directory placeholder" object, or dir_url is itself an object
                continue
            out[name.rsplit("/", 1)[-1]] = Stat(str(e.get("generation", "")), int(e.get("size", 0)),
                                                _parse_time(e.get("updated")))
        return out

    return _idempotent("list", dir_url, ls)


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand_one(p: str) -> list[tuple[str, Stat]]:
    if _check_scheme(p) == "file":
        path = _local(p)
        prefix = "file://" if p.startswith("file://") else ""
        if _has_magic(path):
            found = [f for f in globmod.glob(path, recursive=True) if os.path.isfile(f)]
        elif os.path.isdir(path):
            found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                     if f.endswith(".parquet") and TMP_MARK not in f]
        else:
            found = [path] if os.path.isfile(path) else []
        return [(prefix + f, _local_stat(os.stat(f))) for f in found]
    scheme = _scheme(p)
    fs, path = filesystem(p)
    if _has_magic(path):
        found = fs.glob(path, detail=True, timeout=remaining_s())
        found = {k: v for k, v in found.items() if not k.endswith("/") and v.get("type") == "file"}
    else:
        try:
            one = _gcs_object(p)
            return [(p, _gcs_stat(one))]
        except FileNotFoundError:
            pass
        found = {k: v for k, v in fs.find(path.rstrip("/"), detail=True, timeout=remaining_s()).items()
                 if k.endswith(".parquet")}
    return [(f"{scheme}://{k}", Stat(str(v.get("generation", "")), int(v.get("size", 0)), None))
            for k, v in found.items()]


def expand_stats(paths: str | list[str]) -> list[tuple[str, Stat]]:
    """Dataset discovery: directories (every *.parquet below), globs, files, comma-separated or a list.

    Returns (URL, Stat) sorted by URL, unique (gs:// kept); one listing per path, no request per
    file. Raises ValueError naming the first path that matches nothing.
    """
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    items = [p.strip() for p in items if p and p.strip()]
    if not items:
        raise ValueError("no dataset path given")
    out: dict[str, Stat] = {}
    for p in items:
        found = _idempotent("expand", p, lambda: _expand_one(p))
        if not found:
            raise ValueError(f"{p}: no file matches this pattern" if _has_magic(p)
                             else f"{p}: no such file, and no *.parquet files under it")
        out.update(found)
    return sorted(out.items())


def expand(paths: str | list[str]) -> list[str]:
    """The URLs of expand_stats(paths)."""
    return [u for u, _ in expand_stats(paths)]


def input_version(url: str, st: Stat) -> str:
    """What identifies one version of a corpus file: the GCS generation, or the local mtime (ns)."""
    return st.generation if is_remote(url) else st.generation.split("-", 1)[0]


def open_input(url: str, size: int = -1, version: str = ""):
    """A binary, seekable file object for reading a corpus file (e.g. for pyarrow's ParquetFile).

    With `version` (input_version() of the planned Stat) and `size`, reads are pinned to that
    version: a local file must still have that size and mtime (checked on the open file, before
    and after reading: InputChanged otherwise); a gs:// object is read by ranged requests of that
    generation (a newer one answers 404: InputChanged). Storage failures raise StorageError after
    the bounded retries; a missing file raises FileNotFoundError.
    """
    if _check_scheme(url) == "file":
        return _LocalInput(url, size, version)
    if size < 0 or not version:
        st = stat(url)
        if st is None:
            raise FileNotFoundError(url)
        size, version = (st.size, st.generation) if not version else (st.size, version)
    return _GcsInput(url, size, version)


class _LocalInput(io.FileIO):
    def __init__(self, url: str, size: int, version: str):
        super().__init__(_local(url), "rb")
        self.url, self.want = url, (size, version)
        self.failure: BaseException | None = None  # a read error of the file system (not of the data)
        self.check()

    def readinto(self, b):
        try:
            return super().readinto(b)
        except OSError as e:
            self.failure = StorageError(f"read {self.url}: {_reason(e)}")
            raise self.failure from e

    def check(self) -> None:
        size, version = self.want
        if not version:
            return
        st = os.fstat(self.fileno())
        if st.st_size != size or str(st.st_mtime_ns) != version:
            raise InputChanged(f"{self.url} changed while the job ran (size {size} -> {st.st_size}, "
                               f"mtime_ns {version} -> {st.st_mtime_ns})")

    def close(self) -> None:
        try:
            if not self.closed:
                self.check()
        finally:
            super().close()


class _GcsInput(io.RawIOBase):
    """Ranged reads of one generation of a GCS object, INPUT_BLOCK bytes at a time."""

    def __init__(self, url: str, size: int, generation: str):
        super().__init__()
        self.url, self.size, self.generation = url, size, generation
        self.pos = 0
        self.buf_start, self.buf = 0, b""
        self.failure: BaseException | None = None  # a storage error under a reader (e.g. pyarrow)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        lo = self.pos - self.buf_start
        if not (0 <= lo and lo + n <= len(self.buf)):
            end = min(self.size, self.pos + max(n, INPUT_BLOCK))
            try:
                self.buf_start, self.buf = self.pos, read_range(self.url, self.pos, end, self.generation)
            except BaseException as e:
                self.failure = e
                raise
            lo = 0
            if len(self.buf) < n:
                raise InputChanged(f"{self.url}: generation {self.generation} has fewer bytes than planned")
        b[:n] = self.buf[lo:lo + n]
        self.pos += n
        return n


def read_range(url: str, start: int, end: int, generation: str = "") -> bytes:
    """Bytes [start, end) of a gs:// object (of that generation, if given): one ranged GET.
    A generation that is no longer there raises InputChanged."""
    fs = _gcs_fs()
    bucket, key = _bucket_key(url)
    kw = {"generation": str(generation)} if generation else {}

    def get() -> bytes:
        _, body = fs.call("GET", f"{fs._location}/download/storage/v1/b/{{}}/o/{{}}", bucket, key,
                          alt="media", headers={"Range": f"bytes={start}-{end - 1}"}, timeout=remaining_s(), **kw)
        return body

    try:
        return _idempotent("read", url, get)
    except FileNotFoundError:
        if generation:
            raise InputChanged(f"{url}: the version the job planned (generation {generation}) is gone: "
                               f"the file was rewritten or deleted") from None
        raise

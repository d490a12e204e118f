"""The local file system as an object store (also FUSE mounts such as gcsfuse).

write_bytes: temp + fsync + os.replace. create: a complete, fsynced temp file linked into place
with link(2) (atomic, fails if the name exists); where the file system has no hard links
(EPERM/ENOTSUP/ENOSYS, e.g. FUSE mounts), renameat2(RENAME_NOREPLACE); where it has neither,
rename(2) under the directory's flock (exclusive among the processes of this mount only). replace
(compare-and-swap): directory flock + stat. A reader never sees a partial object. The generation
is mtime_ns-inode-size, with an explicit fine-grained mtime on every write. See docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob as globmod
import logging
import os
import time
import uuid

import fsspec

from kdgen.storage.base import Stat, errors
from kdgen.storage.inputs import LocalInput
from kdgen.storage.urls import has_magic, local_path

log = logging.getLogger(__name__)

TMP_MARK = ".kdgen-tmp-"  # temp files; hidden from listings
LOCK_NAME = ".kdgen.lock"  # per-directory lock for compare-and-swap; hidden from listings
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS)
NO_NOREPLACE = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)
_warned_dirs: set[tuple[str, str]] = set()


def _dirname(path: str) -> str:
    return os.path.dirname(path) or "."


def local_generation(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}-{st.st_ino}-{st.st_size}"


def local_stat(st: os.stat_result) -> Stat:
    return Stat(local_generation(st), st.st_size, st.st_mtime)


def _tmp_path(path: str) -> str:
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def write_tmp(path: str, data: bytes, mtime_ns: int | None = None) -> str:
    """A complete, fsynced temp file beside path; returns its name."""
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


def _replace_with(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _warn_once(path: str, how: str, msg: str) -> None:
    key = (_dirname(path), how)
    if key not in _warned_dirs:
        _warned_dirs.add(key)
        log.warning("%s: %s", _dirname(path), msg)


def renameat2_noreplace(src: str, dst: str) -> None:
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


@contextlib.contextmanager
def dir_lock(path: str):
    """An exclusive flock on path's directory (LOCK_NAME), for compare-and-swap."""
    d = _dirname(path)
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def create_without_link(tmp: str, path: str) -> Stat | None:
    """Create-if-absent of a complete temp file where link(2) is not available."""
    st = local_stat(os.stat(tmp))  # rename keeps the inode, size and mtime: the same generation
    try:
        renameat2_noreplace(tmp, path)
        _warn_once(path, "noreplace", "no hard links on this file system: creating objects with renameat2(NOREPLACE)")
        return st
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno not in NO_NOREPLACE:
            raise
    _warn_once(path, "flock", "no hard links and no renameat2(NOREPLACE) on this file system: create-if-absent "
                              "holds only among the processes of this machine (several hosts: use gs:// directly)")
    with dir_lock(path):
        if os.path.lexists(path):
            return None
        os.rename(tmp, path)
        return st


def local_fs_type(url: str) -> str:
    """The file system type of the mount that holds a local path (from /proc/mounts), '' if unknown."""
    path = os.path.abspath(local_path(url))
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


class LocalStore:
    """Local paths and file:// URLs (kdgen.storage.base.Store)."""

    def exists(self, url: str) -> bool:
        """A file or a directory."""
        return os.path.exists(local_path(url))

    def stat(self, url: str) -> Stat | None:
        try:
            return local_stat(os.stat(local_path(url)))
        except FileNotFoundError:
            return None

    def read_bytes(self, url: str) -> bytes:
        with errors("read", url), open(local_path(url), "rb") as f:
            return f.read()

    def write_bytes(self, url: str, data: bytes) -> None:
        path = local_path(url)
        with errors("write", url):
            _replace_with(write_tmp(path, data), path)

    def create(self, url: str, data: bytes) -> Stat | None:
        path = local_path(url)
        with errors("create", url):
            tmp = write_tmp(path, data)  # complete and fsynced before it gets its name
            try:
                os.link(tmp, path)  # atomic, fails if path exists
                return local_stat(os.stat(tmp))  # same inode as path, and tmp is ours alone
            except FileExistsError:
                return None
            except OSError as e:
                if e.errno not in NO_HARD_LINKS:
                    raise
                return create_without_link(tmp, path)  # e.g. gcsfuse answers ENOSYS
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def replace(self, url: str, data: bytes, generation: str) -> Stat | None:
        path = local_path(url)
        with errors("replace", url), dir_lock(path):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            if local_generation(st) != generation:
                return None
            tmp = write_tmp(path, data, mtime_ns=max(time.time_ns(), st.st_mtime_ns + 1))
            new = local_stat(os.stat(tmp))
            _replace_with(tmp, path)
            return new

    def delete(self, url: str, if_generation: str | None = None, check_first: bool = True) -> None:
        """With if_generation: only while the file is at that generation (under the directory lock)."""
        path = local_path(url)
        with errors("delete", url):
            lock = dir_lock(path) if if_generation is not None else contextlib.nullcontext()
            with lock, contextlib.suppress(FileNotFoundError):
                if if_generation is not None and local_generation(os.stat(path)) != if_generation:
                    return
                os.unlink(path)

    def list_stats(self, dir_url: str, stats: bool = True) -> dict[str, Stat | None]:
        path = local_path(dir_url)
        with errors("list", dir_url):
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
                        if e.is_file():
                            out[e.name] = local_stat(e.stat()) if stats else None
                    except FileNotFoundError:  # deleted while we listed
                        continue
            return out

    def expand(self, p: str) -> list[tuple[str, Stat]]:
        """The files of one dataset path: a glob, a directory (every *.parquet below) or a file."""
        path = local_path(p)
        prefix = "file://" if p.startswith("file://") else ""
        if has_magic(path):
            found = [f for f in globmod.glob(path, recursive=True) if os.path.isfile(f)]
        elif os.path.isdir(path):
            found = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                     if f.endswith(".parquet") and TMP_MARK not in f]
        else:
            found = [path] if os.path.isfile(path) else []
        return [(prefix + f, local_stat(os.stat(f))) for f in found]

    def open_input(self, url: str, size: int = -1, version: str = ""):
        return LocalInput(url, size, version)

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.filesystem("file"), local_path(url)

"""gs:// objects through gcsfs; compare-and-swap and generation-pinned reads through google-cloud-storage.

Every write is one upload (atomic: the object appears whole or not at all). create sends
ifGenerationMatch=0, replace ifGenerationMatch=<generation>; a failed precondition is a 412.
A request whose reply was lost (a timeout, a 503 after the write landed) is retried by us and
then meets its own write as a 412: every conditional upload carries a random write id in the
object's custom metadata, and a 412 is followed by a read-back of it (our id: the write was
ours). Input files are read by ranged GETs of the planned generation. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
import uuid

# Before gcsfs is imported: otherwise every call probes gRPC (45-75 s against an emulator).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

from kdgen.retry import reason  # noqa: E402
from kdgen.storage.base import InputChanged, LocationError, Stat, errors  # noqa: E402
from kdgen.storage.inputs import RangedInput  # noqa: E402
from kdgen.storage.retrying import idempotent, remaining_s, retry  # noqa: E402
from kdgen.storage.urls import bucket_key, has_magic, scheme  # noqa: E402

log = logging.getLogger(__name__)

WRITE_ID = "kdgen-write-id"  # custom metadata: which call wrote this generation (for read-back)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 30.0, 300.0
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
SINGLE_REQUEST = 50 << 20  # gcsfs's default chunk size: smaller writes are one request anyway


def endpoint() -> str | None:
    """KDGEN_GCS_ENDPOINT or STORAGE_EMULATOR_HOST as a URL; None for Google's own."""
    ep = os.environ.get("KDGEN_GCS_ENDPOINT") or os.environ.get("STORAGE_EMULATOR_HOST") or None
    if ep and ep != "default" and "://" not in ep:
        ep = "http://" + ep
    return None if ep == "default" else ep


def parse_time(s: str | None) -> float | None:
    if not s:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def object_stat(o: dict) -> Stat:
    """The Stat of a JSON object resource."""
    return Stat(str(o["generation"]), int(o.get("size", 0)), parse_time(o.get("updated")))


def _blob_stat(blob) -> Stat:
    return Stat(str(blob.generation), int(blob.size or 0), blob.updated.timestamp() if blob.updated else None)


@contextlib.contextmanager
def _status_as_os_errors():
    """google-cloud-storage's 404 and 412 as FileNotFoundError and FileExistsError (as gcsfs raises them)."""
    from google.api_core import exceptions as api

    try:
        yield
    except api.PreconditionFailed as e:
        raise FileExistsError(reason(e)) from e
    except api.NotFound as e:
        raise FileNotFoundError(reason(e)) from e


def _timeout() -> tuple[float, float]:
    """(connect, read) seconds for one request: never past the storage operation's deadline."""
    left = remaining_s()
    return CONNECT_TIMEOUT_S, READ_TIMEOUT_S if left is None else min(READ_TIMEOUT_S, left)


class GcsStore:
    """gs:// and gcs:// URLs (kdgen.storage.base.Store). One gcsfs session per process and
    endpoint (a forked child must not reuse its parent's), one storage client per thread."""

    def __init__(self):
        self._fs: dict[tuple, fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()
        self._clients = threading.local()

    # ---- sessions
    def fs(self):
        """The gcsfs file system for this process and endpoint."""
        ep = endpoint()
        key = (os.getpid(), ep)
        with self._lock:
            fs = self._fs.get(key)
            if fs is None:
                fs = self._fs[key] = self._new_fs(ep)
            return fs

    @staticmethod
    def _new_fs(ep: str | None):
        import aiohttp
        import gcsfs

        cls = gcsfs.GCSFileSystem
        if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() != "true":
            cls = gcsfs.core.GCSFileSystem
        kw = {"token": "anon"} if os.environ.get("STORAGE_EMULATOR_HOST") else {}
        return cls(endpoint_url=ep, use_listings_cache=False, skip_instance_cache=True,
                   requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                                          sock_read=READ_TIMEOUT_S), **kw)

    def client(self):
        """The google-cloud-storage client of this thread (Application Default Credentials;
        anonymous against an emulator). Like gcsfs's aiohttp session, it ignores proxy settings
        in the environment (scanning them costs more than a request to a nearby endpoint)."""
        ep = endpoint()
        key = (os.getpid(), ep, os.environ.get("STORAGE_EMULATOR_HOST"))
        if getattr(self._clients, "key", None) != key:
            import google.auth
            from google.auth.credentials import AnonymousCredentials
            from google.auth.transport.requests import AuthorizedSession
            from google.cloud import storage as gcs

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                credentials, project = AnonymousCredentials(), "kdgen"
            else:
                credentials, project = google.auth.default(scopes=[SCOPE])
            session = AuthorizedSession(credentials)
            session.trust_env = False
            self._clients.client = gcs.Client(project=project, credentials=credentials, _http=session,
                                              client_options={"api_endpoint": ep} if ep else None)
            self._clients.key = key
        return self._clients.client

    def _blob(self, url: str, generation: str = ""):
        bucket, key = bucket_key(url)
        return self.client().bucket(bucket).blob(key, generation=int(generation) if generation else None)

    # ---- requests
    def upload(self, url: str, data: bytes, if_generation_match: str | None = None, write_id: str = "") -> Stat:
        """One upload request; the new object's Stat. A failed precondition raises
        FileExistsError (HTTP 412). write_id goes into the object's custom metadata.

        Unconditional and create-if-absent writes go through gcsfs (pipe_file, mode "create":
        ifGenerationMatch=0), one multipart request whatever the size; gcsfs has no
        compare-and-swap on another generation, so that goes through google-cloud-storage."""
        metadata = {WRITE_ID: write_id} if write_id else None
        if if_generation_match in (None, "0"):
            fs, path = self.filesystem(url)
            o = fs.pipe_file(path, data, metadata=metadata, mode="create" if if_generation_match else "overwrite",
                             content_type="application/octet-stream", chunksize=max(SINGLE_REQUEST, len(data) + 1))
            return object_stat(o) if isinstance(o, dict) else self.stat_now(url)
        blob = self._blob(url)
        blob.metadata = metadata
        with _status_as_os_errors():
            blob.upload_from_string(data, content_type="application/octet-stream", retry=None, timeout=_timeout(),
                                    if_generation_match=int(if_generation_match))
        return _blob_stat(blob)

    def stat_now(self, url: str) -> Stat:
        """The Stat of an object just written (one metadata GET)."""
        return object_stat(self.resource(url))

    def download(self, url: str, start: int | None = None, end: int | None = None, generation: str = "") -> bytes:
        """Bytes [start, end) of the object (of that generation, if given): one GET."""
        with _status_as_os_errors():
            return self._blob(url, generation).download_as_bytes(
                start=start, end=None if end is None else end - 1, retry=None, timeout=_timeout(),
                checksum=None if start is not None else "auto")

    def resource(self, url: str) -> dict:
        """The object's JSON resource (one metadata GET)."""
        bucket, key = bucket_key(url)
        if not key:
            raise FileNotFoundError(url)
        return self.fs().call("GET", "b/{}/o/{}", bucket, key, json_out=True, timeout=remaining_s())

    # ---- the Store
    def exists(self, url: str) -> bool:
        return self.stat(url) is not None

    def stat(self, url: str) -> Stat | None:
        try:
            return object_stat(idempotent("stat", url, lambda: self.resource(url)))
        except FileNotFoundError:
            return None

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.filesystem(url)
        return idempotent("read", url, lambda: fs.cat_file(path, timeout=remaining_s()))

    def write_bytes(self, url: str, data: bytes) -> None:
        idempotent("write", url, lambda: self.upload(url, data))

    def create(self, url: str, data: bytes) -> Stat | None:
        return self._conditional("create", url, data, "0")

    def replace(self, url: str, data: bytes, generation: str) -> Stat | None:
        return self._conditional("replace", url, data, str(generation))

    def _conditional(self, op: str, url: str, data: bytes, generation: str) -> Stat | None:
        """Upload if the object is at `generation` ("0": absent). One write id for every attempt,
        so that a retry that meets a 412 can tell its own earlier success by read-back."""
        wid = uuid.uuid4().hex

        def attempt() -> Stat | None:
            try:
                return self.upload(url, data, if_generation_match=generation, write_id=wid)
            except FileNotFoundError:  # no such bucket
                return None
            except FileExistsError:  # 412: someone else's generation, or our own earlier attempt
                return self.read_back(url, data, wid)

        with errors(op, url):
            return retry(attempt, f"{op} {url}")

    def read_back(self, url: str, data: bytes, write_id: str) -> Stat | None:
        """After a 412: is the stored object this call's own write (a retried request that had
        succeeded)? Decided by the write id in the object's metadata; objects without one
        (written by other tools) are compared by content."""
        try:
            o = idempotent("read-back", url, lambda: self.resource(url))
        except FileNotFoundError:  # deleted since: not ours now
            return None
        stored_id = (o.get("metadata") or {}).get(WRITE_ID)
        if stored_id is not None:
            return object_stat(o) if stored_id == write_id else None
        if int(o.get("size", -1)) != len(data):
            return None
        if o.get("md5Hash"):
            same = o["md5Hash"] == base64.b64encode(hashlib.md5(data).digest()).decode()
        else:  # composite objects carry no md5: compare the bytes of that very generation
            try:
                same = idempotent("read-back", url, lambda: self.download(url, generation=str(o["generation"]))) == data
            except FileNotFoundError:
                return None
        return object_stat(o) if same else None

    def delete(self, url: str, if_generation: str | None = None, check_first: bool = True) -> None:
        """With if_generation the precondition is sent, which real GCS enforces and
        fake-gcs-server ignores, so by default the generation is also checked with a stat first."""
        bucket, key = bucket_key(url)
        kw = {}
        if if_generation is not None:
            if check_first:
                st = self.stat(url)
                if st is None or st.generation != if_generation:
                    return
            kw["ifGenerationMatch"] = str(if_generation)

        def rm():
            try:
                self.fs().call("DELETE", "b/{}/o/{}", bucket, key, **kw)
            except (FileNotFoundError, FileExistsError):  # gone, or changed since (412): leave it
                pass

        idempotent("delete", url, rm)

    def list_stats(self, dir_url: str, stats: bool = True) -> dict[str, Stat | None]:
        """One request per 1,000 objects, generations included (stats=False changes nothing here)."""
        fs, path = self.filesystem(dir_url)
        path = path.rstrip("/")

        def ls():
            try:
                entries = fs.ls(path, detail=True, refresh=True, timeout=remaining_s())
            except FileNotFoundError:
                return {}
            out = {}
            for e in entries:
                name = e["name"].rstrip("/")
                # name == path: a "directory placeholder" object, or dir_url is itself an object
                if e.get("type") == "file" and name != path:
                    out[name.rsplit("/", 1)[-1]] = Stat(str(e.get("generation", "")), int(e.get("size", 0)),
                                                        parse_time(e.get("updated")))
            return out

        return idempotent("list", dir_url, ls)

    def expand(self, p: str) -> list[tuple[str, Stat]]:
        """The objects of one dataset path: a glob, an object, or a prefix (every *.parquet below)."""
        fs, path = self.filesystem(p)
        if has_magic(path):
            found = fs.glob(path, detail=True, timeout=remaining_s())
            found = {k: v for k, v in found.items() if not k.endswith("/") and v.get("type") == "file"}
        else:
            try:
                return [(p, object_stat(self.resource(p)))]
            except FileNotFoundError:
                pass
            found = {k: v for k, v in fs.find(path.rstrip("/"), detail=True, timeout=remaining_s()).items()
                     if k.endswith(".parquet")}
        return [(f"{scheme(p)}://{k}", Stat(str(v.get("generation", "")), int(v.get("size", 0)), None))
                for k, v in found.items()]

    def open_input(self, url: str, size: int = -1, version: str = ""):
        if size < 0 or not version:
            st = self.stat(url)
            if st is None:
                raise FileNotFoundError(url)
            size, version = st.size, version or st.generation
        return RangedInput(url, size, version, self.read_range)

    def read_range(self, url: str, start: int, end: int, generation: str = "") -> bytes:
        """Bytes [start, end) of the object (of that generation, if given): one ranged GET.
        A generation that is no longer there raises InputChanged."""
        try:
            return idempotent("read", url, lambda: self.download(url, start, end, generation))
        except FileNotFoundError:
            if generation:
                raise InputChanged(f"{url}: the version the job planned (generation {generation}) is gone: "
                                   f"the file was rewritten or deleted") from None
            raise

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return self.fs(), url.split("://", 1)[1]

    def check_location(self, url: str, knob: str) -> None:
        """Refuse a gs:// URL without a bucket, or whose bucket does not exist (a bucket whose
        metadata we may not read passes: the objects' own calls will tell)."""
        bucket, _ = bucket_key(url)
        if not bucket:
            raise LocationError(f"{knob} {url}: no bucket named (gs://BUCKET/path)")
        try:
            retry(lambda: self.fs().call("GET", "b/{}", bucket, json_out=True), f"look up bucket {bucket}")
        except FileNotFoundError:
            raise LocationError(f"{knob} {url}: bucket {bucket!r} does not exist") from None
        except Exception as e:  # 403 on the bucket's metadata, ...: not proof of anything
            log.debug("could not look up bucket %s: %s", bucket, reason(e))

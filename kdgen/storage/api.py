"""The storage functions every caller uses, over one Store per URL scheme.

The stores are process-wide: `register(scheme, store)` or `with using(store, scheme):` puts
another in place (tests and bench/fleet_sim.py count or slow down every request that way).
"""

from __future__ import annotations

import contextlib
import json
import threading

from kdgen.storage.base import LocationError, Stat, Store
from kdgen.storage.gcs import GcsStore
from kdgen.storage.local import LocalStore
from kdgen.storage.retrying import idempotent
from kdgen.storage.urls import REMOTE_SCHEMES, check_scheme, has_magic, is_remote, scheme

_stores: dict[str, Store] = {"file": LocalStore(), "gs": GcsStore()}
_stores_lock = threading.Lock()


def _key(s: str) -> str:
    return "gs" if s in REMOTE_SCHEMES else s


def store_for(url: str) -> Store:
    """The store that serves url (ValueError for a scheme we cannot store to)."""
    return _stores[_key(check_scheme(url))]


def register(scheme_: str, store: Store) -> Store:
    """Serve URLs of this scheme ("file", "gs") from `store` from now on; returns the one it replaces."""
    with _stores_lock:
        old, _stores[_key(scheme_)] = _stores[_key(scheme_)], store
    return old


@contextlib.contextmanager
def using(store: Store, scheme_: str = "file"):
    """`store` serves this scheme inside the block; the one before it again after."""
    old = register(scheme_, store)
    try:
        yield store
    finally:
        register(scheme_, old)


def exists(url: str) -> bool:
    """True if an object (gs) or a file or directory (local) exists at url."""
    return store_for(url).exists(url)


def stat(url: str) -> Stat | None:
    """Generation, size and mtime of the object at url; None if there is none."""
    return store_for(url).stat(url)


def read_bytes(url: str) -> bytes:
    return store_for(url).read_bytes(url)


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
    store_for(url).write_bytes(url, data)


def create_if_absent_stat(url: str, data: bytes) -> Stat | None:
    """Create the object only if none exists; its Stat iff this call created it, else None.

    On GCS a retried create whose first reply was lost sees its own object (412): a write id
    in the object's metadata tells this call's own write from another writer's, even when the
    bytes are identical."""
    return store_for(url).create(url, data)


def create_if_absent(url: str, data: bytes) -> bool:
    """create_if_absent_stat, True iff this call created the object."""
    return create_if_absent_stat(url, data) is not None


def replace_if_generation_stat(url: str, data: bytes, generation: str) -> Stat | None:
    """Compare-and-swap: write data only if the object is still at `generation`; the new Stat
    iff this call's data replaced it. On GCS a 412 is followed by a read-back of the object's
    write id (a retried request whose first attempt had succeeded counts as ours)."""
    return store_for(url).replace(url, data, generation)


def replace_if_generation(url: str, data: bytes, generation: str) -> bool:
    """replace_if_generation_stat, True iff this call's data replaced the object."""
    return replace_if_generation_stat(url, data, generation) is not None


def delete(url: str, if_generation: str | None = None, check_first: bool = True) -> None:
    """Delete the object; a missing one is fine.

    With if_generation, delete only while the object is at that generation (local: under the
    directory lock; gs: the precondition is sent, which real GCS enforces and fake-gcs-server
    ignores, so by default the generation is also checked with a stat first: two requests).
    check_first=False sends the one conditional DELETE: for callers to whom deleting a newer
    generation would do no harm where the precondition is not enforced."""
    store_for(url).delete(url, if_generation=if_generation, check_first=check_first)


def list_stats(dir_url: str, stats: bool = True) -> dict[str, Stat | None]:
    """{basename: Stat} of the objects directly under dir_url (with stats=False the values are
    None, and local listings skip the per-file stat). Never cached; on gs:// one request per
    1,000 objects, generations included."""
    return store_for(dir_url).list_stats(dir_url, stats=stats)


def list_names(dir_url: str) -> list[str]:
    """Sorted basenames of the objects directly under dir_url; [] if there are none. Never cached.
    On gs:// one request per 1,000 objects."""
    return sorted(list_stats(dir_url, stats=False))


def expand_stats(paths: str | list[str]) -> list[tuple[str, Stat]]:
    """Dataset discovery: directories (every *.parquet below), globs, files, comma-separated or a list.

    Returns (URL, Stat) sorted by URL, unique (gs:// kept); one listing per path, no request per
    file. Raises ValueError naming the first path that matches nothing."""
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    items = [p.strip() for p in items if p and p.strip()]
    if not items:
        raise ValueError("no dataset path given")
    out: dict[str, Stat] = {}
    for p in items:
        found = idempotent("expand", p, lambda: store_for(p).expand(p))
        if not found:
            raise ValueError(f"{p}: no file matches this pattern" if has_magic(p)
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
    version (kdgen.storage.inputs): InputChanged when the file is not that version any more.
    Storage failures raise StorageError after the bounded retries; a missing file raises
    FileNotFoundError."""
    return store_for(url).open_input(url, size, version)


def read_range(url: str, start: int, end: int, generation: str = "") -> bytes:
    """Bytes [start, end) of a gs:// object (of that generation, if given): one ranged GET.
    A generation that is no longer there raises InputChanged."""
    return store_for(url).read_range(url, start, end, generation)


def filesystem(url: str):
    """(fsspec filesystem, path inside it): local -> (LocalFileSystem, path); gs -> (GCSFileSystem, bucket/key)."""
    return store_for(url).filesystem(url)


def check_location(url: str, knob: str) -> None:
    """Refuse, naming the knob, a URL scheme we cannot store to and a gs:// bucket that does not
    exist (a bucket we may not read the metadata of passes: the objects' own calls will tell)."""
    s = scheme(url)
    if s not in ("file",) + REMOTE_SCHEMES:
        raise LocationError(f"{knob} {url}: unsupported URL scheme {s}://; use a local path, file:// or gs://")
    if s != "file":
        store_for(url).check_location(url, knob)

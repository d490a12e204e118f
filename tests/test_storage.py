"""kdgen.storage on local directories and on gs:// (a real fake-gcs-server on 127.0.0.1)."""

from __future__ import annotations

import os
import threading
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage
from kdgen.storage import StorageError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("gcs_server")
    return server.url(f"t-{uuid.uuid4().hex[:10]}")


def test_urls():
    assert storage.is_remote("gs://b/k") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")
    assert storage.join("gs://b/d/", "_claims", "x.json") == "gs://b/d/_claims/x.json"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("/tmp/d", "a", "b") == "/tmp/d/a/b"
    assert storage.join("file:///tmp/d/", "a") == "file:///tmp/d/a"
    with pytest.raises(ValueError, match="s3://b/k"):
        storage.exists("s3://b/k")


def test_roundtrip(base):
    u = storage.join(base, "a", "x.bin")
    assert not storage.exists(u) and storage.stat(u) is None
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(u)
    storage.write_bytes(u, b"hello")
    assert storage.exists(u) and storage.read_bytes(u) == b"hello"
    st = storage.stat(u)
    assert st.size == 5 and st.generation
    storage.write_bytes(u, b"world!")
    st2 = storage.stat(u)
    assert storage.read_bytes(u) == b"world!" and st2.size == 6 and st2.generation != st.generation
    storage.delete(u)
    storage.delete(u)  # missing is fine
    assert not storage.exists(u)


def test_create_if_absent(base):
    u = storage.join(base, "deep", "er", "c.json")
    assert storage.create_if_absent(u, b"first") is True
    assert storage.create_if_absent(u, b"second") is False
    assert storage.create_if_absent(u, b"first") is False  # same bytes, another call: not ours
    assert storage.read_bytes(u) == b"first"
    st = storage.create_if_absent_stat(storage.join(base, "deep", "d.json"), b"x")
    assert st == storage.stat(storage.join(base, "deep", "d.json"))


def test_replace_if_generation(base):
    u = storage.join(base, "cas.json")
    assert storage.replace_if_generation(u, b"x", "123") is False  # missing
    storage.write_bytes(u, b"v0")
    g0 = storage.stat(u).generation
    seen = {g0}
    g = g0
    for i in range(1, 30):  # generations never repeat, even for rapid same-size writes
        st = storage.replace_if_generation_stat(u, b"v%d" % (i % 10), g)
        assert st is not None and st.generation not in seen and st == storage.stat(u)
        seen.add(st.generation)
        g = st.generation
    assert storage.replace_if_generation(u, b"stale", g0) is False
    assert storage.read_bytes(u) == b"v9"
    storage.delete(u, if_generation=g0)  # not the current generation: kept
    assert storage.exists(u)
    storage.delete(u, if_generation=g)
    assert not storage.exists(u)


def test_list_names(base):
    d = storage.join(base, "out")
    assert storage.list_names(d) == []
    for n in ["b.jsonl", "a.jsonl", "sub/c.json"]:
        storage.write_bytes(storage.join(d, n), b"1")
    assert storage.list_names(d) == ["a.jsonl", "b.jsonl"]
    assert storage.list_names(storage.join(d, "sub")) == ["c.json"]
    storage.delete(storage.join(d, "a.jsonl"))
    assert storage.list_names(d) == ["b.jsonl"]  # fresh, no listing cache
    u = storage.join(d, "z.json")
    storage.write_bytes(u, b"1")
    storage.replace_if_generation(u, b"2", storage.stat(u).generation)
    assert storage.list_names(d) == ["b.jsonl", "z.json"]  # no temp or lock files show


def _parquet(url: str, n: int) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(n)]}), sink)
    storage.write_bytes(url, sink.getvalue().to_pybytes())


def test_expand_and_open_input(base):
    d = storage.join(base, "data")
    for n in ["train/0.parquet", "train/1.parquet", "val/0.parquet", "train/notes.txt"]:
        _parquet(storage.join(d, n), 3)
    t0, t1, v0 = (storage.join(d, n) for n in ["train/0.parquet", "train/1.parquet", "val/0.parquet"])
    assert storage.expand(d) == [t0, t1, v0]
    assert storage.expand(storage.join(d, "train")) == [t0, t1]
    assert storage.expand(storage.join(d, "train", "*.parquet")) == [t0, t1]
    assert storage.expand(f"{v0},{t0}") == [t0, v0]
    assert storage.expand([v0, t1, v0]) == [t1, v0]
    for bad in [storage.join(d, "nope"), storage.join(d, "*.csv"), [t0, storage.join(d, "x.parquet")]]:
        with pytest.raises(ValueError, match="nope|csv|x.parquet"):
            storage.expand(bad)
    with storage.open_input(t1) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_rows == 3
        assert pf.read().column("text").to_pylist() == ["row 0", "row 1", "row 2"]
    with pytest.raises(FileNotFoundError):
        storage.open_input(storage.join(d, "missing.parquet")).close()


def test_file_url(tmp_path):
    u = f"file://{tmp_path}/f/x.parquet"
    _parquet(u, 2)
    assert storage.exists(u) and storage.expand(f"file://{tmp_path}/f") == [u]
    assert storage.filesystem(u)[1] == f"{tmp_path}/f/x.parquet"


def test_local_races_threads(tmp_path):
    """Threads racing on create and on compare-and-swap: exactly one winner each time."""
    for round_ in range(20):
        u = str(tmp_path / f"r{round_}.json")
        barrier = threading.Barrier(8)
        wins = []

        def create(i):
            barrier.wait()
            wins.append(storage.create_if_absent(u, b"%d" % i))

        ts = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert sum(wins) == 1
        g = storage.stat(u).generation
        cas = []

        def swap(i):
            barrier.wait()
            cas.append(storage.replace_if_generation(u, b"%d" % (i + 100), g))

        ts = [threading.Thread(target=swap, args=(i,)) for i in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert sum(cas) == 1


def test_local_write_is_atomic(tmp_path):
    u = str(tmp_path / "big.bin")
    a, b = b"a" * (4 << 20), b"b" * (4 << 20)
    storage.write_bytes(u, a)
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            data = storage.read_bytes(u)
            if data not in (a, b):
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        storage.write_bytes(u, b if i % 2 == 0 else a)
    stop.set()
    t.join()
    assert not bad
    assert storage.list_names(str(tmp_path)) == ["big.bin"]


def test_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"^write .*file/x: FileExistsError") as e:
        storage.write_bytes(str(tmp_path / "file" / "x"), b"1")
    assert "\n" not in str(e.value)


def test_retry_helper():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.retry(flaky, "flaky", attempts=4, base_delay=0.001) == "ok" and len(calls) == 3
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "missing", attempts=4, base_delay=0.001)
    assert len(calls) == 1  # not transient: no retry
    with pytest.raises(TimeoutError):
        storage.retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "slow", attempts=2, base_delay=0.001)
    assert storage.is_transient(type("HttpError", (Exception,), {"code": 503})())
    assert not storage.is_transient(type("HttpError", (Exception,), {"code": 404})())


def test_gcs_errors_are_storage_errors(gcs_server, monkeypatch):
    """A non-retriable answer (403) becomes a one-line StorageError naming the op and the URL."""
    from tests.proxy import FaultProxy

    with FaultProxy(gcs_server.endpoint, mode="forbid") as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        u = gcs_server.url("forbidden", "x.json")
        for op, call in [("write", lambda: storage.write_bytes(u, b"1")),
                         ("create", lambda: storage.create_if_absent(u, b"1")),
                         ("read", lambda: storage.read_bytes(u)),
                         ("list", lambda: storage.list_names(gcs_server.url("forbidden")))]:
            with pytest.raises(StorageError) as e:
                call()
            msg = str(e.value)
            assert msg.startswith(f"{op} gs://") and "\n" not in msg and "Forbidden" in msg, msg


def test_create_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    u = str(tmp_path / "d" / "x.json")
    st = storage.create_if_absent_stat(u, b"one")
    assert st == storage.stat(u) and storage.create_if_absent(u, b"two") is False
    assert storage.read_bytes(u) == b"one" and storage.list_names(str(tmp_path / "d")) == ["x.json"]


def test_conditional_write_retried_after_client_gave_up(gcs_server, monkeypatch):
    """The client gave up on a request that had in fact succeeded: our own retry meets a 412,
    reads back its write id and still reports the write as its own (create and CAS)."""
    failed = []

    class ReplyLost(storage.GcsStore):  # the first two uploads land, but their replies are lost
        def upload(self, url, data, if_generation_match=None, write_id=""):
            out = super().upload(url, data, if_generation_match, write_id)
            if len(failed) < 2:
                failed.append(url)
                raise TimeoutError("reply lost")
            return out

    monkeypatch.setattr(storage.settings, "base_delay_s", 0.001)
    u = gcs_server.url(f"gave-up-{uuid.uuid4().hex[:8]}.json")
    with storage.using(ReplyLost(), "gs"):
        st = storage.create_if_absent_stat(u, b"mine")
        assert st is not None and st == storage.stat(u) and len(failed) == 1
        st2 = storage.replace_if_generation_stat(u, b"mine too", st.generation)
        assert st2 is not None and st2 == storage.stat(u) and len(failed) == 2
        assert storage.create_if_absent(u, b"mine") is False  # a different call: not ours
    assert isinstance(storage.store_for(u), storage.GcsStore) and not isinstance(storage.store_for(u), ReplyLost)


def test_create_on_fuse_without_hard_links(tmp_path, monkeypatch):
    """gcsfuse answers link(2) with ENOSYS: create-if-absent still works, exactly once."""
    import errno

    def no_link(src, dst):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "link", no_link)
    u = str(tmp_path / "d" / "x.json")
    st = storage.create_if_absent_stat(u, b"one")
    assert st == storage.stat(u) and storage.create_if_absent(u, b"two") is False
    assert storage.read_bytes(u) == b"one" and storage.list_names(str(tmp_path / "d")) == ["x.json"]


@pytest.mark.parametrize("where", ["any file", "the object's own name"])
def test_a_failed_create_never_leaves_a_partial_object(tmp_path, monkeypatch, where):
    """Without hard links, the old fallback wrote the object under its own name with O_EXCL: a
    write that failed half way there (disk full, a kill) left a partial object that counted as
    done. Now bytes are only ever written to a temp file, complete before the object gets its
    name: after any create, the object is absent or whole."""
    import errno

    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    real_fdopen = os.fdopen

    class HalfWriter:  # writes half of what it is given, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.f.write(b[: len(b) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        name = os.readlink(f"/proc/self/fd/{fd}")
        return HalfWriter(f) if where == "any file" or storage.TMP_MARK not in name else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    u = str(tmp_path / "d" / "chunk_rows_0000000_0000010.jsonl")
    data = b'{"row": 1}\n' * 1000
    try:
        storage.create_if_absent(u, data)
    except StorageError:
        pass
    assert not os.path.lexists(u) or open(u, "rb").read() == data
    assert [n for n in storage.list_names(str(tmp_path / "d")) if storage.read_bytes(storage.join(str(tmp_path / "d"), n)) != data] == []
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    storage.create_if_absent(u, data)
    assert storage.read_bytes(u) == data


@pytest.mark.parametrize("noreplace", [True, False])
def test_create_races_without_hard_links(tmp_path, monkeypatch, noreplace):
    """Threads racing to create one object where link(2) fails: with renameat2(NOREPLACE), and with
    neither (rename under the directory's flock): exactly one creator, never a partial object."""
    import errno

    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no link")))
    if not noreplace:
        monkeypatch.setattr(storage.local, "renameat2_noreplace",
                            lambda src, dst: (_ for _ in ()).throw(OSError(errno.EINVAL, "no noreplace")))
    for round_ in range(10):
        u = str(tmp_path / f"r{round_}.json")
        barrier = threading.Barrier(8)
        wins = []

        def create(i):
            barrier.wait()
            wins.append(storage.create_if_absent(u, b"%d" % i * 1000))

        ts = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert sum(wins) == 1 and len(storage.read_bytes(u)) == 1000
    assert len(storage.list_names(str(tmp_path))) == 10

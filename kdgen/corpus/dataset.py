"""Parquet discovery, footer-only planning into chunks, and reading exactly one chunk's rows.

A chunk is (parquet file, row_start, row_end). The plan depends only on (file list, chunk size,
seed, limit), so every host computes the same plan and the same shuffled order; a file's output
name (its stem) is its path relative to DATASET_PATH's base (the job file pins it: jobfile.py).
Reading a chunk separates the two kinds of failure: a row group whose bytes do not decode is the
rows' own data (error records); a storage failure or a file that is not the version planned
raises and stops the job. See docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from kdgen import storage
from kdgen.config import FILE_FORMATS
from kdgen.storage import InputChanged, StorageError

log = logging.getLogger(__name__)

CHUNK_NAME = re.compile(r"^(?P<stem>.+)_rows_(?P<start>\d{7,})_(?P<end>\d{7,})$")
CHUNK_EXTENSIONS = tuple("." + f for f in FILE_FORMATS)  # of chunk objects; parse_chunk_name strips them


class DatasetError(ValueError):
    """Bad input data; the message names the file (and column or row)."""


@dataclass(frozen=True)
class Chunk:
    file: str  # URL of the parquet file
    stem: str  # unique short name of the file, used in output object names
    start: int  # first row (inclusive)
    end: int  # last row (exclusive)
    # The file's planned version (storage.input_version) and size: reads are pinned to them.
    version: str = field(default="", compare=False, repr=False)
    size: int = field(default=-1, compare=False, repr=False)

    @property
    def name(self) -> str:
        return chunk_name(self.stem, self.start, self.end)

    @property
    def num_rows(self) -> int:
        return self.end - self.start


def chunk_name(stem: str, start: int, end: int) -> str:
    return f"{stem}_rows_{start:07d}_{end:07d}"


def parse_chunk_name(name: str) -> tuple[str, int, int] | None:
    """'shard_rows_0000000_0001000[.jsonl]' -> ('shard', 0, 1000); None if not a chunk name."""
    base = name
    for ext in CHUNK_EXTENSIONS:
        if name.endswith(ext):
            base = name[: -len(ext)]
            break
    m = CHUNK_NAME.match(base)
    return (m["stem"], int(m["start"]), int(m["end"])) if m else None


@dataclass(frozen=True)
class FileInfo:
    url: str
    stem: str
    num_rows: int
    size: int = -1
    version: str = ""  # storage.input_version: GCS generation, local mtime in ns
    digest: str = ""  # sha256 of the parquet footer (of the whole file for JSONL)

    def pin(self) -> dict:
        return {"url": self.url, "stem": self.stem, "rows": self.num_rows, "size": self.size,
                "version": self.version, "digest": self.digest}

    @staticmethod
    def from_pin(d: dict) -> "FileInfo":
        return FileInfo(d["url"], d["stem"], int(d["rows"]), int(d.get("size", -1)), str(d.get("version", "")),
                        str(d.get("digest", "")))


@dataclass(frozen=True)
class Plan:
    files: tuple[FileInfo, ...]
    chunks: tuple[Chunk, ...]  # in the shared shuffled order

    @property
    def num_rows(self) -> int:
        return sum(c.num_rows for c in self.chunks)

    def summary(self) -> str:
        sizes = sorted(f.num_rows for f in self.files)
        return (
            f"{len(self.files)} files, {self.num_rows} rows, {len(self.chunks)} chunks "
            f"(rows per file min {sizes[0] if sizes else 0} max {sizes[-1] if sizes else 0})"
        )


def _path(url: str) -> str:
    return url.split("://", 1)[-1]


def _stem(path: str, base: str) -> str:
    rel = posixpath.relpath(path, base) if base else path
    return re.sub(r"\.(parquet|jsonl|json)$", "", rel).replace("/", "__")


def dataset_base(dataset_path: str | list[str], files: list[str]) -> str:
    """The folder that stems are relative to, from DATASET_PATH itself (not from the files found,
    so adding a file in a new subfolder renames nothing): a directory item is its own base, a
    file item its folder, a glob the folder part before its first wildcard; several
    comma-separated items: the common folder of their bases. `files` (the URLs found) tells a
    file item from a directory item."""
    items = dataset_path.split(",") if isinstance(dataset_path, str) else list(dataset_path)
    found = {_path(f) for f in files}
    bases = []
    for item in (i.strip() for i in items if i and i.strip()):
        p = _path(item).rstrip("/")
        if any(c in p for c in "*?["):
            parts = p.split("/")
            first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            bases.append("/".join(parts[:first]))
        elif p in found:
            bases.append(posixpath.dirname(p))
        else:
            bases.append(p)
    if len(bases) == 1:
        return bases[0]
    try:
        return posixpath.commonpath(bases)
    except ValueError:  # absolute and relative paths mixed
        return ""


def file_stems(urls: list[str], base: str) -> list[str]:
    """Short unique names: each file's path relative to `base` (dataset_base), without the
    suffix, '/' -> '__'."""
    return [_stem(_path(u), base) for u in urls]


def legacy_file_stems(urls: list[str]) -> list[str]:
    """The stems of kdgen versions before the corpus pin: relative to the common folder of the
    files found (used only to resume jobs those versions started)."""
    paths = [_path(u) for u in urls]
    common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(
        [posixpath.dirname(p) for p in paths])
    return [_stem(p, common) for p in paths]


def check_column(url: str, schema: pa.Schema, column: str, want: str) -> None:
    names = schema.names
    if column not in names:
        raise DatasetError(f"{url}: column {column!r} not found; columns are {names}")
    typ = schema.field(column).type
    if want == "string" and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DatasetError(f"{url}: column {column!r} has type {typ}, expected string")
    if want == "messages" and not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        raise DatasetError(
            f"{url}: column {column!r} has type {typ}, expected a list of {{role, content}} structs")


def is_jsonl(url: str) -> bool:
    return url.endswith((".jsonl", ".json"))


def _jsonl_table(url: str, data: bytes) -> pa.Table:
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{url}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DatasetError(f"{url}: line {e.lineno}: not JSON ({e.msg})") from None
    return pa.Table.from_pylist(rows) if rows else pa.table({})


def read_jsonl(url: str, size: int = -1, version: str = "") -> pa.Table:
    """A JSON-lines file as a table (JSONL inputs are small chat sets; parquet is for corpora)."""
    with storage.open_input(url, size, version) as f:
        return _jsonl_table(url, f.read())


@dataclass(frozen=True)
class Footer:
    num_rows: int
    schema: pa.Schema
    digest: str


def footer_digest(meta: pq.FileMetaData) -> str:
    """sha256 of the serialized parquet footer (row groups, column chunk offsets and sizes,
    statistics): equal footers mean an unchanged file for every practical purpose. The footer is
    serialized by pyarrow's public write_metadata_file ("PAR1", footer, 4-byte length, "PAR1"):
    the same thrift bytes, so the same digest, as the pickling earlier kdgen used (pinned in
    existing jobs' _job.json: tests/test_dataset.py checks they stay equal)."""
    sink = io.BytesIO()
    meta.write_metadata_file(sink)
    return hashlib.sha256(sink.getvalue()[4:-8]).hexdigest()


def read_footer(url: str, size: int = -1, version: str = "") -> Footer:
    """Row count, schema and digest from the footer (JSONL: the whole file). One line naming the
    file for a file that is not readable parquet; storage failures raise StorageError."""
    try:
        if is_jsonl(url):
            with storage.open_input(url, size, version) as f:
                data = f.read()
            t = _jsonl_table(url, data)
            return Footer(t.num_rows, t.schema, hashlib.sha256(data).hexdigest())
        with storage.open_input(url, size, version) as f:
            meta = pq.ParquetFile(f).metadata
            return Footer(meta.num_rows, meta.schema.to_arrow_schema(), footer_digest(meta))
    except (StorageError, InputChanged, DatasetError, MemoryError):
        raise
    except FileNotFoundError:
        raise DatasetError(f"{url}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DatasetError(f"{url}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def discover(dataset_path: str | list[str]) -> list[tuple[str, storage.Stat]]:
    """Every corpus file under DATASET_PATH with its size and version, sorted by URL. A file
    whose name is not valid UTF-8 is refused: its name could not be stored in the output."""
    found = storage.expand_stats(dataset_path)
    for url, _ in found:
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(url) if not storage.is_remote(url) else url.encode("utf-8", "backslashreplace")
            raise DatasetError(f"{shown!r}: the input file's name is not valid UTF-8, so its output could not "
                               f"be named after it; rename the file (or move it out of DATASET_PATH)") from None
    return found


def describe(found: list[tuple[str, storage.Stat]], stems: list[str],
             columns: dict[str, str] | None = None) -> list[FileInfo]:
    """FileInfo of each file from its footer (in parallel); checks the required columns."""
    if not found:
        return []

    def one(item):
        (url, st), stem = item
        version = storage.input_version(url, st)
        footer = read_footer(url, st.size, version)
        for column, kind in (columns or {}).items():
            check_column(url, footer.schema, column, kind)
        if footer.num_rows == 0:
            log.warning("%s has 0 rows; nothing to generate from it", url)
        return FileInfo(url, stem, footer.num_rows, st.size, version, footer.digest)

    with ThreadPoolExecutor(max_workers=min(16, len(found))) as pool:
        return list(pool.map(one, zip(found, stems)))


def check_unique_stems(files: list[FileInfo]) -> None:
    seen: dict[str, str] = {}
    for f in files:
        if f.stem in seen:
            raise DatasetError(f"{seen[f.stem]} and {f.url} map to the same output name {f.stem!r}; "
                               f"rename one of them")
        seen[f.stem] = f.url


def plan_files(files: list[FileInfo], chunk_size: int, seed: int = 0, limit: int = 0) -> Plan:
    """Cut files (taken in URL order) into chunks of chunk_size rows and shuffle them with seed."""
    files = sorted(files, key=lambda f: f.url)
    check_unique_stems(files)
    planned, chunks = [], []
    remaining = limit if limit > 0 else None
    for f in files:
        n = f.num_rows
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        planned.append(FileInfo(f.url, f.stem, n, f.size, f.version, f.digest))
        for start in range(0, n, chunk_size):
            chunks.append(Chunk(f.url, f.stem, start, min(start + chunk_size, n), f.version, f.size))
    random.Random(seed).shuffle(chunks)
    return Plan(tuple(planned), tuple(chunks))


def plan(
    dataset_path: str | list[str],
    chunk_size: int,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    limit: int = 0,
) -> Plan:
    """Cut every parquet file into chunks of chunk_size rows, reading footers only.

    columns maps a required column name to its kind ("string" or "messages"); every file is
    checked up front so that a bad shard fails the job before any generation starts. (A job
    plans from the files pinned in its job file instead: kdgen.corpus.jobfile.)
    """
    found = discover(dataset_path)
    stems = file_stems([u for u, _ in found], dataset_base(dataset_path, [u for u, _ in found]))
    return plan_files(describe(found, stems, columns), chunk_size, seed, limit)


def host_order(chunks: tuple[Chunk, ...] | list[Chunk], host_index: int, num_hosts: int) -> list[Chunk]:
    """The shared order, rotated so that each host starts at its own offset (rarely contending)."""
    if not chunks:
        return []
    offset = (len(chunks) * host_index) // max(num_hosts, 1)
    return list(chunks[offset:]) + list(chunks[:offset])


@dataclass
class ChunkRows:
    """The rows of one chunk: tables of the readable rows, and the row ranges whose row group
    does not decode (the rows' own data: they become error records)."""

    parts: list[tuple[int, pa.Table]]  # (row index of the table's first row, table)
    bad: list[tuple[int, int, str]]  # (first row, end row, reason)

    @property
    def num_rows(self) -> int:
        return sum(t.num_rows for _, t in self.parts) + sum(e - s for s, e, _ in self.bad)


def read_chunk_rows(chunk: Chunk, columns: list[str]) -> ChunkRows:
    """Read rows [start, end) of one file, one overlapping row group at a time.

    Raises StorageError (storage failed after the bounded retries), InputChanged (the file is
    not the version planned, or has fewer rows), MemoryError: all stop the job. Only a row group
    whose bytes do not decode lands in `bad`.
    """
    if is_jsonl(chunk.file):
        t = read_jsonl(chunk.file, chunk.size, chunk.version)
        rows = ChunkRows([(chunk.start, t.select(columns).slice(chunk.start, chunk.num_rows))], [])
    else:
        rows = _read_parquet_rows(chunk, columns)
    if rows.num_rows != chunk.num_rows:
        raise InputChanged(f"{chunk.file}: rows {chunk.start}-{chunk.end} planned, only {rows.num_rows} there: "
                           f"the file changed since the job planned it")
    return rows


def _read_parquet_rows(chunk: Chunk, columns: list[str]) -> ChunkRows:
    parts, bad = [], []
    with storage.open_input(chunk.file, chunk.size, chunk.version) as f:
        try:
            pf = pq.ParquetFile(f)
        except (StorageError, InputChanged, MemoryError):
            raise
        except (pa.ArrowException, OSError) as e:  # the footer decoded when planned: not the same file
            raise InputChanged(f"{chunk.file}: footer no longer readable ({str(e).splitlines()[0]})") from None
        meta = pf.metadata
        row = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            lo, hi = max(row, chunk.start), min(row + n, chunk.end)
            if lo < hi:
                try:
                    t = pf.read_row_group(i, columns=columns, use_threads=False)  # see columns.decode_parquet
                except (StorageError, InputChanged, MemoryError):
                    raise
                except (pa.ArrowException, OSError, ValueError) as e:
                    if getattr(f, "failure", None) is not None:  # the storage under pyarrow failed
                        raise f.failure from e
                    bad.append((lo, hi, f"row group {i} of {chunk.file} does not decode: {str(e).splitlines()[0]}"))
                else:
                    parts.append((lo, t.slice(lo - row, hi - lo)))
            row += n
    return ChunkRows(parts, bad)


def read_chunk(chunk: Chunk, columns: list[str]) -> pa.Table:
    """All rows [start, end) of one chunk as one table; DatasetError if a row group does not decode."""
    rows = read_chunk_rows(chunk, columns)
    if rows.bad:
        raise DatasetError(rows.bad[0][2])
    tables = [t for _, t in rows.parts]
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})

"""Parquet discovery, footer-only planning into chunks, and reading exactly one chunk's rows.

A chunk is (parquet file, row_start, row_end). The plan depends only on (file list, chunk size,
seed, limit), so every host computes the same plan and the same shuffled order.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from kdgen import storage

log = logging.getLogger(__name__)

CHUNK_NAME = re.compile(r"^(?P<stem>.+)_rows_(?P<start>\d{7,})_(?P<end>\d{7,})$")


class DatasetError(ValueError):
    """Bad input data; the message names the file (and column or row)."""


@dataclass(frozen=True)
class Chunk:
    file: str  # URL of the parquet file
    stem: str  # unique short name of the file, used in output object names
    start: int  # first row (inclusive)
    end: int  # last row (exclusive)

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
    base = name[:-6] if name.endswith(".jsonl") else name
    m = CHUNK_NAME.match(base)
    return (m["stem"], int(m["start"]), int(m["end"])) if m else None


@dataclass(frozen=True)
class FileInfo:
    url: str
    stem: str
    num_rows: int


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


def file_stems(urls: list[str]) -> list[str]:
    """Short unique names: the path relative to the files' common folder, without the suffix."""
    paths = [u.split("://", 1)[-1] for u in urls]
    common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(
        [posixpath.dirname(p) for p in paths])
    stems = []
    for p in paths:
        rel = posixpath.relpath(p, common) if common else p
        rel = re.sub(r"\.(parquet|jsonl|json)$", "", rel)
        stems.append(rel.replace("/", "__"))
    return stems


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


def read_jsonl(url: str) -> pa.Table:
    """A JSON-lines file as a table (JSONL inputs are small chat sets; parquet is for corpora)."""
    try:
        with storage.open_input(url) as f:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DatasetError(f"{url}: line {e.lineno}: not JSON ({e.msg})") from None
    return pa.Table.from_pylist(rows) if rows else pa.table({})


class JsonlMeta:
    """The two things planning needs from a footer, for a JSONL file."""

    def __init__(self, table: pa.Table):
        self.num_rows = table.num_rows
        self._schema = table.schema

    @property
    def schema(self):
        return self

    def to_arrow_schema(self) -> pa.Schema:
        return self._schema


def read_footer(url: str):
    if is_jsonl(url):
        return JsonlMeta(read_jsonl(url))
    try:
        with storage.open_input(url) as f:
            return pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise DatasetError(f"{url}: file not found") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DatasetError(f"{url}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def plan(
    dataset_path: str | list[str],
    chunk_size: int,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    limit: int = 0,
) -> Plan:
    """Cut every parquet file into chunks of chunk_size rows, reading footers only.

    columns maps a required column name to its kind ("string" or "messages"); every file is
    checked up front so that a bad shard fails the job before any generation starts.
    """
    urls = storage.expand(dataset_path)
    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        metas = list(pool.map(read_footer, urls))
    stems = file_stems(urls)
    if len(set(stems)) != len(stems):
        raise DatasetError("two dataset files map to the same output name; rename one of them")
    files, chunks = [], []
    remaining = limit if limit > 0 else None
    for url, stem, meta in zip(urls, stems, metas):
        for column, kind in (columns or {}).items():
            check_column(url, meta.schema.to_arrow_schema(), column, kind)
        n = meta.num_rows
        if remaining is not None:
            n = min(n, remaining)
            remaining -= n
        if meta.num_rows == 0:
            log.warning("%s has 0 rows; nothing to generate from it", url)
        files.append(FileInfo(url, stem, n))
        for start in range(0, n, chunk_size):
            chunks.append(Chunk(url, stem, start, min(start + chunk_size, n)))
    random.Random(seed).shuffle(chunks)
    return Plan(tuple(files), tuple(chunks))


def host_order(chunks: tuple[Chunk, ...] | list[Chunk], host_index: int, num_hosts: int) -> list[Chunk]:
    """The shared order, rotated so that each host starts at its own offset (rarely contending)."""
    if not chunks:
        return []
    offset = (len(chunks) * host_index) // max(num_hosts, 1)
    return list(chunks[offset:]) + list(chunks[:offset])


def read_chunk(chunk: Chunk, columns: list[str]) -> pa.Table:
    """Read rows [start, end) of one file, touching only the row groups that overlap them."""
    if is_jsonl(chunk.file):
        return read_jsonl(chunk.file).select(columns).slice(chunk.start, chunk.num_rows)
    with storage.open_input(chunk.file) as f:
        pf = pq.ParquetFile(f)
        groups, first_row, row = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if row < chunk.end and row + n > chunk.start:
                groups.append(i)
                if first_row is None:
                    first_row = row
            row += n
        if not groups:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        table = pf.read_row_groups(groups, columns=columns, use_threads=False)  # see columns.decode_parquet
    return table.slice(chunk.start - first_row, chunk.num_rows)

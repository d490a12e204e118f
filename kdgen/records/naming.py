"""Where a job's chunk objects live in OUT: their names and URLs, and parsing a listing.

`OUT/{stem}_rows_{start:07d}_{end:07d}.{file format}` holds a finished chunk (chunk_object.py);
`OUT/_errors/{same name}.jsonl` is the human index of its failed rows. See docs/outputs.md.
"""

from __future__ import annotations

from kdgen import storage
from kdgen.config import FILE_FORMATS
from kdgen.corpus.dataset import Chunk, parse_chunk_name

ERRORS_DIR = "_errors"


def output_url(out: str, chunk: Chunk, file_format: str = "jsonl") -> str:
    return storage.join(out, f"{chunk.name}.{file_format}")


def errors_url(out: str, chunk: Chunk) -> str:
    return errors_index_url(out, chunk.name)


def errors_index_url(out: str, name: str) -> str:
    """OUT/_errors/<chunk>.jsonl of a chunk object's name (with or without its file format)."""
    parsed = parse_object_name(name)
    return storage.join(out, ERRORS_DIR, (parsed[0] if parsed else name) + ".jsonl")


def file_format_of(url: str) -> str:
    for fmt in FILE_FORMATS:
        if url.endswith("." + fmt):
            return fmt
    raise ValueError(f"{url}: not a chunk object (expected {' or '.join('.' + f for f in FILE_FORMATS)})")


def parse_object_name(name: str) -> tuple[str, str] | None:
    """'shard_rows_0000000_0001000.parquet' -> ('shard_rows_0000000_0001000', 'parquet'); None if
    the name is not a chunk object's."""
    base, _, ext = name.rpartition(".")
    return (base, ext) if ext in FILE_FORMATS and parse_chunk_name(base) else None


def finished_chunk_names(out: str) -> set[str]:
    """Names (without extension) of the chunk objects already in OUT, of either file format
    (one listing: one request per 1,000 objects)."""
    return {p[0] for p in map(parse_object_name, storage.list_names(out)) if p}

"""The chunk object codec: a finished chunk's records and failed rows as ONE immutable object
(JSONL or parquet, with the sha256 of its own content), created once, and read back.

Read chunk objects only through `read_chunk_object(url) -> (records, errors)`: both formats give
the same record dicts (parquet logprobs rounded to float16). The layout, the hash and the
`_errors/` index are described in docs/outputs.md#chunk-objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from kdgen import storage
from kdgen.json_lines import json_line
from kdgen.corpus.dataset import Chunk
from kdgen.records import parquet_codec
from kdgen.records.builders import sampling_settings
from kdgen.records.naming import errors_url, file_format_of, output_url
from kdgen.records.schema import CONVERSATIONS_ROW_KEY, is_inline_error, row_key

log = logging.getLogger(__name__)

# 2: a chunk object holds its error rows; _errors/ is an index written after the create won.
# Jobs whose _job.json has no "layout" (layout 1) wrote errors only to _errors/, before the create.
CHUNK_LAYOUT = 2
HASH_KEY = "kdgen_sha256"  # the last key of a JSONL chunk object's first line
_JSONL_SEAL = re.compile(rb'(, )?"kdgen_sha256": "([0-9a-f]{64})"}$')


class BadChunkObject(ValueError):
    """A chunk object that does not decode, or whose content does not match its stated hash."""


def job_layout(c) -> dict:
    """Written into a new _job.json (outside the fingerprint): how this job's chunk objects look."""
    return {"chunk_layout": CHUNK_LAYOUT, "file_format": c.output_file_format, "sampling": sampling_settings(c)}


def _in_row_order(records: list[dict], errors: list[dict]) -> list[dict]:
    """Records and error lines of a chunk, by row (conversations already hold their error rows)."""
    inline = {r["metadata"][CONVERSATIONS_ROW_KEY] for r in records if is_inline_error(r)}
    lines = records + [e for e in errors if e["row_idx"] not in inline]
    return sorted(lines, key=row_key)  # stable: samples keep their order


# ---------------------------------------------------------------- encoding

def encode_jsonl(lines: list[dict]) -> bytes:
    return "".join(json_line(r) for r in lines).encode()


def encode_chunk(c, records: list[dict], errors: list[dict]) -> bytes:
    """One chunk object of the job's OUTPUT_FILE_FORMAT holding the records and error rows, and
    the hash of its content."""
    lines = _in_row_order(records, errors)
    if c.output_file_format == "parquet":
        meta = {"chunk_layout": CHUNK_LAYOUT, "task": c.task, "output_format": c.output_format,
                "sampling": sampling_settings(c)}
        return parquet_codec.encode_parquet(lines, meta, content_hash=True)
    return seal_jsonl(encode_jsonl(lines))


def seal_jsonl(body: bytes) -> bytes:
    """JSONL bytes with `"kdgen_sha256": sha256(body)` added as the first line's last key."""
    if not body:
        return body
    first, nl, rest = body.partition(b"\n")
    seal = b'"%s": "%s"}' % (HASH_KEY.encode(), hashlib.sha256(body).hexdigest().encode())
    first = first[:-1] + (seal if first.rstrip() == b"{}" else b", " + seal)
    return first + nl + rest


def content_hash(data: bytes, file_format: str) -> tuple[str, str] | None:
    """(stated, actual) sha256 of a chunk object's content; None if it states none (an object
    written before chunk objects carried hashes)."""
    if file_format == "parquet":
        return parquet_codec.content_hash(data)
    first, nl, rest = data.partition(b"\n")
    m = _JSONL_SEAL.search(first)
    if m is None:
        return None
    body = first[:m.start()] + b"}" + nl + rest
    return m[2].decode(), hashlib.sha256(body).hexdigest()


# ---------------------------------------------------------------- decoding

def decode_chunk(data: bytes, file_format: str) -> tuple[list[dict], list[dict]]:
    """(records, errors) of a chunk object's bytes; errors as {parquet_file, row_idx, error} plus
    error_kind where the writer recorded one (kdgen.prompts.DATA_ERROR_KINDS)."""
    if file_format == "parquet":
        lines = parquet_codec.decode_parquet(data)
    else:
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if lines and isinstance(lines[0], dict):
            lines[0].pop(HASH_KEY, None)
    recs, errs = [], []
    for r in lines:
        if not isinstance(r, dict):
            raise ValueError(f"a line is {type(r).__name__}, not a record object")
        if "error" in r:
            errs.append(_error_line(r.get("parquet_file"), r["row_idx"], r["error"], r.get("error_kind")))
        elif is_inline_error(r):
            m = r["metadata"]
            errs.append(_error_line(m.get("parquet_file"), m[CONVERSATIONS_ROW_KEY], m["error"], m.get("error_kind")))
        else:
            recs.append(r)
    return recs, errs


def _error_line(parquet_file, row_idx, error, kind) -> dict:
    e = {"parquet_file": parquet_file, "row_idx": row_idx, "error": error}
    if kind:
        e["error_kind"] = kind
    return e


def read_chunk_object(url: str) -> tuple[list[dict], list[dict]]:
    """The records and the failed rows ({parquet_file, row_idx, error}) of one chunk object.
    Conversations' failed rows (metadata.error lines) come back as errors, not records.
    BadChunkObject (naming the object) if it is damaged."""
    records, errors, _ = read_chunk_checked(url)
    return records, errors


def read_chunk_checked(url: str) -> tuple[list[dict], list[dict], bool]:
    """read_chunk_object plus whether the object stated a content hash (that matched)."""
    fmt = file_format_of(url)
    data = storage.read_bytes(url)
    try:
        hashes = content_hash(data, fmt)
        if hashes is not None and hashes[0] != hashes[1]:
            raise ValueError(f"content hash mismatch: it states sha256 {hashes[0][:12]}..., its content has "
                             f"{hashes[1][:12]}... (a truncated or altered copy)")
        records, errors = decode_chunk(data, fmt)
    except Exception as e:
        raise BadChunkObject(f"{url}: unreadable chunk object ({type(e).__name__}: {str(e)[:200]})") from e
    return records, errors, hashes is not None


# ---------------------------------------------------------------- commit

def commit_chunk(c, chunk: Chunk, records: list[dict], errors: list[dict]) -> bool:
    """Create the chunk object (records and error rows in one create). True if this call created
    it; False if it already existed (another host finished it first): nothing is duplicated and
    nothing of ours is written. The winner then writes the _errors/ index (best effort)."""
    out = c.output_path
    created = storage.create_if_absent(output_url(out, chunk, c.output_file_format),
                                       encode_chunk(c, records, errors))
    if created and errors:
        try:
            storage.write_bytes(errors_url(out, chunk), encode_jsonl(errors))
        except Exception as e:  # only an index: the chunk object holds the errors
            log.warning("could not write the errors index of %s (the chunk object holds them): %s", chunk.name, e)
    return created

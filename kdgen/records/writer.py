"""Record schema, chunk objects (JSONL or parquet), and the commit-once of a finished chunk.

A chunk's outcome is ONE immutable object, `OUT/{stem}_rows_{start:07d}_{end:07d}.{jsonl|parquet}`,
created with create-if-absent: it appears whole or not at all, a chunk finished by two hosts is
stored once, and it holds everything about its rows, the records AND the rows that failed:

  * jsonl: one JSON record per line; a failed row is the line {"parquet_file", "row_idx", "error"}
    (conversations keep their own line with metadata.error);
  * parquet: typed columns (token ids int32 lists, top-k ids int32, logprobs float16, JSON text for
    metadata), one row per record, failed rows carry the `error` column.

`OUT/_errors/<chunk>.jsonl` is a human index of the failed rows, written only by the host whose
create won, after it; nothing trusts it. Outputs made before this layout (no "layout" in _job.json)
wrote their errors ONLY to `_errors/`, before the chunk object; the audit still reads them there.

Read chunk objects only through `read_chunk_object(url) -> (records, errors)`: both formats give
the same record dicts (parquet logprobs rounded to float16).

Every chunk object states the sha256 of its own content, in the same create, in a place every
plain reader passes over: parquet, a key of the footer's key-value metadata (parquet_codec.HASH_KEY);
JSONL, the last key of the FIRST line, `"kdgen_sha256": HEX` (a trailer line would be a record
to `datasets`/DuckDB; this is one extra column, null after the first row). The JSONL hash covers
the object's bytes with that key taken out of the first line. Readers verify it (a truncated
copy or a bad re-upload is an unreadable object); objects written before hashes have none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re

from kdgen import storage
from kdgen.corpus.dataset import Chunk
from kdgen.engines.base import Finished
from kdgen.corpus import jobfile
from kdgen.prompts import Prompt

log = logging.getLogger(__name__)

JOB_FILE, FingerprintMismatch = jobfile.JOB_FILE, jobfile.FingerprintMismatch  # kept importable from here
ERRORS_DIR = "_errors"
CLAIMS_DIR = "_claims"
FILE_FORMATS = ("jsonl", "parquet")
# 2: a chunk object holds its error rows; _errors/ is an index written after the create won.
# Jobs whose _job.json has no "layout" (layout 1) wrote errors only to _errors/, before the create.
CHUNK_LAYOUT = 2
LOGPROB_KEYS = ("token_logprobs", "top_token_ids", "top_logprobs")
# PROMPT_LOGPROBS: the same for every prompt position t (row 0: null / [], nothing predicts it).
PROMPT_LOGPROB_KEYS = ("prompt_token_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")
HASH_KEY = "kdgen_sha256"  # in the first line of a JSONL chunk object (see the module docstring)
_JSONL_SEAL = re.compile(rb'(, )?"kdgen_sha256": "([0-9a-f]{64})"}$')


def output_url(out: str, chunk: Chunk, file_format: str = "jsonl") -> str:
    return storage.join(out, f"{chunk.name}.{file_format}")


def errors_url(out: str, chunk: Chunk) -> str:
    return storage.join(out, ERRORS_DIR, chunk.name + ".jsonl")


def sampling_settings(c) -> dict:
    """What a trainer needs to interpret the logprobs (and re-temperature them)."""
    s = {"logprobs_mode": c.logprobs_mode, "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
         "logprobs": c.logprobs}
    if c.prompt_logprobs:
        s["prompt_logprobs"] = True
    return s


def job_layout(c) -> dict:
    """Written into a new _job.json (outside the fingerprint): how this job's chunk objects look."""
    return {"chunk_layout": CHUNK_LAYOUT, "file_format": c.output_file_format, "sampling": sampling_settings(c)}


# ---------------------------------------------------------------- records

def prompt_logprob_fields(prompt: Prompt, finished: Finished, k: int) -> dict:
    """{prompt_token_logprobs, prompt_top_token_ids, prompt_top_logprobs} of a request sent with
    prompt_logprobs=k; row t is the distribution of prompt token t, as in the completion's rows."""
    from kdgen.score import plain_prompt_logprobs

    return dict(zip(PROMPT_LOGPROB_KEYS, plain_prompt_logprobs(prompt.token_ids, finished.prompt_logprobs, k)))


def sequence_kd_records(chunk: Chunk, prompt: Prompt, finished: Finished, sampling: dict | None = None,
                        prompt_lps: dict | None = None) -> list[dict]:
    records = []
    for s in finished.samples:
        r = {
            "parquet_file": chunk.file,
            "row_idx": prompt.row_idx,
            "prefix": prompt.prefix,
            "generated": s.text,
            "prompt_token_ids": prompt.token_ids,
            "completion_token_ids": s.token_ids,
            "finish_reason": s.finish_reason,
            "sample_idx": s.index,
        }
        if s.top_token_ids is not None:
            r["token_logprobs"] = s.token_logprobs
            r["top_token_ids"] = s.top_token_ids
            r["top_logprobs"] = s.top_logprobs
            if prompt_lps:
                r.update(prompt_lps)
            if sampling:
                r["sampling"] = sampling
        if s.reasoning:
            r["reasoning"] = s.reasoning
        if finished.metadata:
            r["metadata"] = finished.metadata
        records.append(r)
    return records


def conversations_records(chunk: Chunk, prompt: Prompt, finished: Finished | None,
                          sampling: dict | None = None, prompt_lps: dict | None = None) -> list[dict]:
    """ShareGPT style: {id, conversations: [{from, value}...], metadata}. Failed rows carry
    metadata.error so that a chat dataset keeps one line per input row."""
    turns = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
             for m in (prompt.messages or [])]
    base_meta = {"parquet_file": chunk.file, "idx": prompt.row_idx}
    if finished is None:
        return [{"id": f"{chunk.stem}-{prompt.row_idx}", "conversations": turns,
                 "metadata": {**base_meta, "error": prompt.error, "error_kind": prompt.error_kind}}]
    records = []
    for s in finished.samples:
        meta = {**base_meta, "sample_idx": s.index, "finish_reason": s.finish_reason,
                "usage": {"prompt_tokens": len(prompt.token_ids), "completion_tokens": len(s.token_ids)},
                **finished.metadata}
        if s.top_token_ids is not None:
            meta.update(token_logprobs=s.token_logprobs, top_token_ids=s.top_token_ids,
                        top_logprobs=s.top_logprobs)
            if prompt_lps:  # and the ids they belong to (a conversation holds only texts)
                meta.update(prompt_token_ids=prompt.token_ids, completion_token_ids=s.token_ids, **prompt_lps)
            if sampling:
                meta["sampling"] = sampling
        if s.reasoning:
            meta["reasoning"] = s.reasoning
        records.append({"id": f"{chunk.stem}-{prompt.row_idx}",
                        "conversations": turns + [{"from": "gpt", "value": s.text}],
                        "metadata": meta})
    return records


def records(c, chunk: Chunk, prompt: Prompt, finished: Finished | None) -> list[dict]:
    """The output records of one row in the job's format (finished is None for an error row;
    only conversations keep error rows as records)."""
    if c.task == "score":
        from kdgen.score import score_records

        return score_records(chunk, prompt, finished) if finished is not None else []
    sampling = sampling_settings(c) if c.logprobs > 0 else None
    prompt_lps = (prompt_logprob_fields(prompt, finished, c.logprobs)
                  if c.prompt_logprobs and finished is not None and finished.samples else None)
    if c.output_format == "conversations":
        return conversations_records(chunk, prompt, finished, sampling, prompt_lps)
    return sequence_kd_records(chunk, prompt, finished, sampling, prompt_lps) if finished is not None else []


def error_record(chunk: Chunk, prompt: Prompt) -> dict:
    return {"parquet_file": chunk.file, "row_idx": prompt.row_idx, "error": prompt.error,
            "error_kind": prompt.error_kind}


def row_key(r: dict) -> tuple[int, int]:
    """(row_idx, sample_idx) of a sequence_kd, score, conversations or error record."""
    if "row_idx" in r:
        return r["row_idx"], r.get("sample_idx", 0)
    meta = r["metadata"]
    return meta["idx"], meta.get("sample_idx", 0)


def _is_inline_error(r: dict) -> bool:
    return "conversations" in r and "error" in (r.get("metadata") or {})


def _in_row_order(records: list[dict], errors: list[dict]) -> list[dict]:
    """Records and error lines of a chunk, by row (conversations already hold their error rows)."""
    inline = {r["metadata"]["idx"] for r in records if _is_inline_error(r)}
    lines = records + [e for e in errors if e["row_idx"] not in inline]
    return sorted(lines, key=row_key)  # stable: samples keep their order


# ---------------------------------------------------------------- encoding

def encode_jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode()


def encode_chunk(c, records: list[dict], errors: list[dict]) -> bytes:
    """One chunk object of the job's OUTPUT_FILE_FORMAT holding the records and error rows, and
    the hash of its content."""
    lines = _in_row_order(records, errors)
    if c.output_file_format == "parquet":
        from kdgen.records import parquet_codec

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
        from kdgen.records import parquet_codec

        return parquet_codec.content_hash(data)
    first, nl, rest = data.partition(b"\n")
    m = _JSONL_SEAL.search(first)
    if m is None:
        return None
    body = first[:m.start()] + b"}" + nl + rest
    return m[2].decode(), hashlib.sha256(body).hexdigest()


def decode_chunk(data: bytes, file_format: str) -> tuple[list[dict], list[dict]]:
    """(records, errors) of a chunk object's bytes; errors as {parquet_file, row_idx, error} plus
    error_kind where the writer recorded one (kdgen.prompts.DATA_ERROR_KINDS)."""
    if file_format == "parquet":
        from kdgen.records import parquet_codec

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
        elif _is_inline_error(r):
            m = r["metadata"]
            errs.append(_error_line(m.get("parquet_file"), m["idx"], m["error"], m.get("error_kind")))
        else:
            recs.append(r)
    return recs, errs


def _error_line(parquet_file, row_idx, error, kind) -> dict:
    e = {"parquet_file": parquet_file, "row_idx": row_idx, "error": error}
    if kind:
        e["error_kind"] = kind
    return e


def file_format_of(url: str) -> str:
    for fmt in FILE_FORMATS:
        if url.endswith("." + fmt):
            return fmt
    raise ValueError(f"{url}: not a chunk object (expected .jsonl or .parquet)")


class BadChunkObject(ValueError):
    """A chunk object that does not decode, or whose content does not match its stated hash."""


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


def parse_object_name(name: str) -> tuple[str, str] | None:
    """'shard_rows_0000000_0001000.parquet' -> ('shard_rows_0000000_0001000', 'parquet'); None if
    the name is not a chunk object's."""
    from kdgen.corpus.dataset import parse_chunk_name

    base, _, ext = name.rpartition(".")
    return (base, ext) if ext in FILE_FORMATS and parse_chunk_name(base) else None


def finished_chunk_names(out: str) -> set[str]:
    """Names (without extension) of the chunk objects already in OUT, of either file format
    (one listing: one request per 1,000 objects)."""
    return {p[0] for p in map(parse_object_name, storage.list_names(out)) if p}

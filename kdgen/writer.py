"""Record schema, output object names, and the commit-once of a finished chunk.

A chunk's output is one immutable object, `OUT/{stem}_rows_{start:07d}_{end:07d}.jsonl`,
created with create-if-absent: it appears whole or not at all, and a chunk finished by two hosts
is stored once. Rows that could not be generated go to `OUT/_errors/<same name>.jsonl`, written
BEFORE the chunk object, so that a chunk object always means "these rows are fully accounted for".
"""

from __future__ import annotations

import json

from kdgen import storage
from kdgen.dataset import Chunk, parse_chunk_name
from kdgen.engine import Finished
from kdgen.jobfile import JOB_FILE, FingerprintMismatch  # noqa: F401  (kept importable from here)
from kdgen.prompts import Prompt

ERRORS_DIR = "_errors"
CLAIMS_DIR = "_claims"


def output_url(out: str, chunk: Chunk) -> str:
    return storage.join(out, chunk.name + ".jsonl")


def errors_url(out: str, chunk: Chunk) -> str:
    return storage.join(out, ERRORS_DIR, chunk.name + ".jsonl")


def sequence_kd_records(chunk: Chunk, prompt: Prompt, finished: Finished) -> list[dict]:
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
        if s.reasoning:
            r["reasoning"] = s.reasoning
        if finished.metadata:
            r["metadata"] = finished.metadata
        records.append(r)
    return records


def conversations_records(chunk: Chunk, prompt: Prompt, finished: Finished | None) -> list[dict]:
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
        if s.reasoning:
            meta["reasoning"] = s.reasoning
        records.append({"id": f"{chunk.stem}-{prompt.row_idx}",
                        "conversations": turns + [{"from": "gpt", "value": s.text}],
                        "metadata": meta})
    return records


def records(c, chunk: Chunk, prompt: Prompt, finished: Finished | None) -> list[dict]:
    """The output records of one row in the job's format (finished is None for an error row;
    only conversations keep error rows in line)."""
    if c.task == "score":
        from kdgen.score import score_records

        return score_records(chunk, prompt, finished) if finished is not None else []
    if c.output_format == "conversations":
        return conversations_records(chunk, prompt, finished)
    return sequence_kd_records(chunk, prompt, finished) if finished is not None else []


def error_record(chunk: Chunk, prompt: Prompt) -> dict:
    return {"parquet_file": chunk.file, "row_idx": prompt.row_idx, "error": prompt.error,
            "error_kind": prompt.error_kind}


def encode_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def commit_chunk(out: str, chunk: Chunk, records: list[dict], errors: list[dict]) -> bool:
    """Write errors (if any) then the chunk object. True if this call created the chunk object;
    False if it already existed (another host finished it first): nothing is duplicated."""
    if errors:
        storage.write_bytes(errors_url(out, chunk), encode_jsonl(errors))
    return storage.create_if_absent(output_url(out, chunk), encode_jsonl(records))


def chunk_of_object(object_name: str) -> str | None:
    """'x_rows_0000000_0000010.jsonl' -> 'x_rows_0000000_0000010'; None for other objects."""
    from kdgen.dataset import CHUNK_EXTENSIONS

    for ext in CHUNK_EXTENSIONS:
        if object_name.endswith(ext) and parse_chunk_name(object_name):
            return object_name[: -len(ext)]
    return None


def finished_chunk_names(out: str) -> set[str]:
    """Names (without extension) of the chunk objects already in OUT (one listing)."""
    return {c for c in map(chunk_of_object, storage.list_names(out)) if c}

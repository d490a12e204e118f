"""Shard rows of the record-shaped targets: `--to parquet` (the records, one column set per
job), `--to messages` (role/content turns plus TRL's prompt-completion) and `--to text` (prefix
mode: plain text), written as JSONL or parquet. See docs/outputs.md.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from kdgen.records import chunk_object, parquet_codec, schema


def write_rows(path: str, parts, file_format: str, cols: list[str], types: dict | None = None) -> int:
    """Rows of every part into one JSONL or parquet file (a row group per part; one schema;
    `types`: parquet_codec.EXPORT_TYPES of columns that are not record fields)."""
    n = 0
    if file_format == "jsonl":
        with open(path, "wb") as f:
            for rows in parts:
                f.write(chunk_object.encode_jsonl([{k: r[k] for k in cols if k in r} for r in rows]))
                n += len(rows)
        return n
    pw = None
    try:
        for rows in parts:
            if not rows:
                continue
            table = parquet_codec.to_table(rows, cols + [parquet_codec.EXTRA], types=types)
            if pw is None:
                pw = pq.ParquetWriter(path, table.schema, **parquet_codec.writer_options(table.schema))
            pw.write_table(table)
            n += len(rows)
        if pw is None:  # no rows at all: an empty file of the same schema
            schema = parquet_codec.to_table([], cols + [parquet_codec.EXTRA], types=types).schema
            pw = pq.ParquetWriter(path, schema, **parquet_codec.writer_options(schema))
    finally:
        if pw is not None:
            pw.close()
    return n


def record_columns(fp: dict) -> list[str]:
    """One column set for every shard of a job (the keys its records can have), so that a reader
    of the directory sees one schema."""
    kind = schema.record_kind(fp.get("task", "generate"), fp.get("output_format", "sequence_kd"))
    return schema.columns(kind, fp.get("logprobs", 0), bool(fp.get("prompt_logprobs")))


def export_columns(to: str) -> list[str]:
    """The columns of a `--to messages` / `--to text` shard."""
    return [name for name, _ in schema.EXPORT_COLUMNS[to]]


def messages_row(r: dict, fp: dict) -> dict:
    """A chat job's record -> `messages` (role/content) and TRL's conversational prompt-completion
    form: `prompt` = every turn before the last, `completion` = [the last, assistant turn]."""
    if "conversations" in r:
        meta = r.get("metadata") or {}
        msgs = [{"role": schema.ROLE_ALIASES.get(t["from"], t["from"]), "content": t["value"]} for t in r["conversations"]]
        row = {"id": r.get("id"), "parquet_file": meta.get("parquet_file"), "row_idx": schema.row_of(r),
               "sample_idx": meta.get("sample_idx", 0)}
    else:
        msgs = []
        if fp.get("system_prompt"):
            msgs.append({"role": "system", "content": fp["system_prompt"]})
        msgs += [{"role": "user", "content": r["prefix"]}, {"role": "assistant", "content": r["generated"]}]
        row = {"parquet_file": r["parquet_file"], "row_idx": r["row_idx"], "sample_idx": r.get("sample_idx", 0)}
    return {"messages": msgs, "prompt": msgs[:-1], "completion": msgs[-1:], **row}


def completion_decoder(fp: dict):
    """(prompt ids, completion ids) -> the completion's text as it continues the prompt's text
    (leading space kept: the records' `generated` is stripped, as the MaxText generator did),
    decoded with the job's tokenizer as vLLM decodes (kdgen.engines.vllm_engine.stream_decoder)."""
    from kdgen.engines.vllm_engine import localize_model, stream_decoder
    from kdgen.prompts import load_tokenizer

    tok = load_tokenizer(localize_model(fp["tokenizer"]))
    stream = stream_decoder(tok)
    if stream is not None:
        return stream

    def decode(prompt_ids: list[int], completion_ids: list[int]) -> str:  # a slow tokenizer
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(list(prompt_ids) + list(completion_ids), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode(completion_ids, skip_special_tokens=True)

    return decode


def text_row(r: dict, decode) -> dict:
    """A prefix-mode record -> plain text: `prompt` (the prefix's text) + `completion` = `text`."""
    completion = decode(r["prompt_token_ids"], r["completion_token_ids"])
    return {"text": r["prefix"] + completion, "prompt": r["prefix"], "completion": completion,
            "parquet_file": r["parquet_file"], "row_idx": r["row_idx"], "sample_idx": r.get("sample_idx", 0)}

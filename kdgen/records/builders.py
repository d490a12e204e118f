"""What a finished row becomes: the records of one row in the job's output format (sequence_kd,
conversations, score) and the error line of a failed row. Field by field they follow the
schema (schema.py; docs/outputs.md); the chunk object that carries them is chunk_object.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdgen.records.schema import CONVERSATIONS_ROW_KEY, PROMPT_LOGPROB_KEYS, SPEAKERS

if TYPE_CHECKING:  # annotations only: records depend on no engine and no prompt builder
    from kdgen.corpus.dataset import Chunk
    from kdgen.engines.base import Finished
    from kdgen.prompts import Prompt


def sampling_settings(c) -> dict:
    """What a trainer needs to interpret the logprobs (and re-temperature them)."""
    s = {"logprobs_mode": c.logprobs_mode, "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
         "logprobs": c.logprobs}
    if c.prompt_logprobs:
        s["prompt_logprobs"] = True
    return s


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
    turns = [{"from": SPEAKERS.get(m["role"], m["role"]), "value": m["content"]} for m in (prompt.messages or [])]
    base_meta = {"parquet_file": chunk.file, CONVERSATIONS_ROW_KEY: prompt.row_idx}
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
                        "conversations": turns + [{"from": SPEAKERS["assistant"], "value": s.text}],
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

"""Shard rows of the top-k targets: the teacher's top-k at every token, aligned as each trainer
reads it (row t = the distribution of token t + 1): `--to distillkit` and `--to axolotl-kd`
(parquet), `--to maxtext-offline` (ArrayRecord of tf.train.Example). The alignment table is in
docs/outputs.md#alignment-which-distribution-sits-in-row-t.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kdgen.export.targets import ExportError
from kdgen.records import schema


def next_token_segments(r: dict, k: int):
    """A record with top-k at every token -> (ids, top_ids, top_lps) per sequence, where row t of
    the top-k is the distribution of token t + 1 (MaxText's and DistillKit's convention), one row
    per token that has a successor, plus, for scored segments, the row after the last token:
      score records: each segment; rows top_*[s+1 .. e-1] and next_top_*[j];
      generation records (PROMPT_LOGPROBS): prompt + completion ids; rows prompt_top_*[1:] and
      top_* (no distribution was computed after the last generated token)."""
    if "token_ids" in r:
        ids = r["token_ids"]
        starts = r.get("segment_starts", [0])
        for j, (s, e) in enumerate(zip(starts, starts[1:] + [len(ids)])):
            yield (ids[s:e], r["top_token_ids"][s + 1:e] + [r["next_top_token_ids"][j]],
                   r["top_logprobs"][s + 1:e] + [r["next_top_logprobs"][j]])
        return
    src = schema.provenance(r)
    ids = src.get("prompt_token_ids", r.get("prompt_token_ids"))
    if ids is None or "prompt_top_token_ids" not in src:
        raise ExportError(f"{row_name(r)}: the record has no prompt top-k (run with --prompt_logprobs)")
    yield (ids + src.get("completion_token_ids", r.get("completion_token_ids", [])),
           src["prompt_top_token_ids"][1:] + src["top_token_ids"], src["prompt_top_logprobs"][1:] + src["top_logprobs"])


def row_name(r: dict) -> str:
    meta = r.get("metadata") or {}
    return f"{r.get('parquet_file', meta.get('parquet_file'))} row {schema.row_of(r)}"


def checked_rows(r: dict, top_ids: list, top_lps: list, k: int) -> np.ndarray:
    """The top-k logprobs as float32 [rows, k], after checking every row holds k entries."""
    bad = next((t for t, row in enumerate(top_ids) if len(row) != k), None)
    if bad is not None:
        raise ExportError(f"{row_name(r)}: top-k row {bad} has {len(top_ids[bad])} entries, not {k}")
    values = np.asarray(top_lps, dtype=np.float32).reshape(len(top_ids), k)
    if np.isnan(values).any():  # a null logprob (float16 cannot hold it: never expected)
        raise ExportError(f"{row_name(r)}: a top-k logprob is missing")
    return values


def write_distillkit(path: str, parts, k: int) -> int:
    """DistillKit's uncompressed offline rows (its LogprobCompressor.decompress_to_sparse takes
    `token_ids` / `top_values` as they are): input_ids [L], token_ids and top_values [L-1, k], row j
    the teacher's raw top-k logprobs of input_ids[j + 1], as its capture script
    (sample_logits_vllm.py: vLLM prompt_logprobs without the empty first row) stores them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("token_ids", pa.list_(pa.list_(pa.int64()))),
                        ("top_values", pa.list_(pa.list_(pa.float32())))])
    n = 0
    with pq.ParquetWriter(path, arrow_schema, compression="zstd") as pw:
        for records in parts:
            rows = {"input_ids": [], "token_ids": [], "top_values": []}
            for r in records:
                for ids, top_ids, top_lps in next_token_segments(r, k):
                    if "token_ids" in r:  # scored: DistillKit keeps no row after the last token
                        top_ids, top_lps = top_ids[:-1], top_lps[:-1]
                    values = checked_rows(r, top_ids, top_lps, k)
                    rows["input_ids"].append(ids)
                    rows["token_ids"].append(top_ids)
                    rows["top_values"].append(values.tolist())
                    n += 1
            if rows["input_ids"]:
                pw.write_table(pa.table(rows, schema=arrow_schema))
    return n


# ---------------------------------------------------------------- axolotl-kd

def axolotl_row(r: dict, k: int) -> dict:
    """A generation record -> one tokenized row of Axolotl's KD dataset, as its KD chat-template
    strategy leaves it for DataCollatorForKD and the KD trainer: input_ids = prompt + completion
    ids (the teacher's tokens: no re-templating), labels -100 over the prompt, and L rows of k where
    row t is compared with the student's output at position t, i.e. the teacher's distribution of
    input_ids[t + 1]. The completion's top-k fill rows P-1 .. L-2 (completion token i was drawn
    from row P-1+i); every other row is Axolotl's own filler (ids 0..k-1, -inf, mask 0). Values are
    the stored top-k logprobs renormalized over the k (log-softmax), as Axolotl's loader does."""
    src = schema.provenance(r)
    prompt, completion = src["prompt_token_ids"], src["completion_token_ids"]
    top_ids = src["top_token_ids"]
    values = checked_rows(r, top_ids, src["top_logprobs"], k)
    if len(top_ids) != len(completion) or not prompt:
        raise ExportError(f"{row_name(r)}: {len(top_ids)} top-k rows for {len(completion)} completion tokens "
                          f"after {len(prompt)} prompt tokens")
    values = values - np.logaddexp.reduce(values, axis=1, keepdims=True)
    p, n = len(prompt), len(completion)
    filler = (list(range(k)), [float("-inf")] * k, [0] * k)
    before, after = p - 1, 1  # rows 0 .. P-2 and row L-1 (nothing was computed after the last token)
    return {
        "input_ids": list(prompt) + list(completion),
        "labels": [-100] * p + list(completion),
        "attention_mask": [1] * (p + n),
        "target_token_ids": [filler[0]] * before + [list(x) for x in top_ids] + [filler[0]] * after,
        "target_logprobs": [filler[1]] * before + values.tolist() + [filler[1]] * after,
        "target_mask": [filler[2]] * before + [[1] * k] * n + [filler[2]] * after,
    }


def write_axolotl(path: str, parts, k: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = pa.list_(pa.int64())
    arrow_schema = pa.schema([("input_ids", ints), ("labels", ints), ("attention_mask", ints),
                        ("target_token_ids", pa.list_(ints)), ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
                        ("target_mask", pa.list_(ints))])
    n = 0
    with pq.ParquetWriter(path, arrow_schema, compression="zstd") as pw:
        for records in parts:
            rows = [axolotl_row(r, k) for r in records]
            if rows:
                pw.write_table(pa.Table.from_pylist(rows, schema=arrow_schema))
                n += len(rows)
    return n


# ---------------------------------------------------------------- maxtext-offline

def maxtext_examples(r: dict, k: int):
    """A record with top-k at every token -> one tf.train.Example per sequence, in the layout of
    MaxText's save_top_k_teacher_logits.py: `inputs` [L] and, per position t, the teacher's top-k
    of the distribution of the token after t: `top_k_logits` [L*k] (float32) and `top_k_indices`
    [L*k] (int64), plus `sequence_hash` and the fields that script saves by default
    (inputs_position, inputs_segmentation, targets, targets_segmentation) for an unpacked sequence.
    A generation record's last token has no row (nothing was computed after it), so its example's
    inputs stop before it: the last token is still every other position's target."""
    from kdgen.export import tfexample

    for ids, top_ids, top_lps in next_token_segments(r, k):
        if len(top_ids) < len(ids):
            ids = ids[:len(top_ids)]
        values = checked_rows(r, top_ids, top_lps, k)
        inputs = np.asarray(ids, dtype=np.int64)
        n = len(inputs)
        seg = np.ones(n, dtype=np.int64)
        yield tfexample.example({
            "inputs": inputs,
            "top_k_logits": values,
            "top_k_indices": np.asarray(top_ids, dtype=np.int64),
            "sequence_hash": [sequence_hash(inputs)],
            "inputs_position": np.arange(n, dtype=np.int64),
            "inputs_segmentation": seg,
            "targets": np.append(inputs[1:], 0),
            "targets_segmentation": np.append(seg[1:], 0),
        })


def sequence_hash(inputs: np.ndarray) -> int:
    """A stable int64 of the tokens (MaxText uses Python's hash(tokens.tobytes()), which is salted
    per process; nothing reads it back)."""
    return int.from_bytes(hashlib.blake2b(inputs.tobytes(), digest_size=8).digest(), "little", signed=True)


def write_maxtext(path: str, parts, k: int) -> int:
    from array_record.python import array_record_module

    w = array_record_module.ArrayRecordWriter(path, "group_size:1")  # as MaxText's writer
    n = 0
    try:
        for records in parts:
            for r in records:
                for ex in maxtext_examples(r, k):
                    w.write(ex)
                    n += 1
    finally:
        w.close()
    return n

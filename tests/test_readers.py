"""kdgen's parquet (chunk objects and export shards) read by the real readers users have: DuckDB,
polars, pyarrow and `datasets`, on generation records (top-k of completion and prompt) and score
records. No engine: the records are made here, the files by kdgen's own encoders."""

from __future__ import annotations

import math
import os
import random

import pytest

from kdgen.records import parquet_codec
from kdgen.export import shards
from kdgen.records import writer

K = 20
VOCAB = 128256  # ids of a real vocabulary need the high bytes too


def topk_rows(rng: random.Random, n: int, empty_first: bool = False) -> tuple[list, list]:
    ids = [[rng.randrange(VOCAB) for _ in range(K)] for _ in range(n)]
    lps = [sorted((-rng.expovariate(0.5) for _ in range(K)), reverse=True) for _ in range(n)]
    if n and empty_first:
        ids[0], lps[0] = [], []
    return ids, lps


def generation_records(rng: random.Random, n: int = 6) -> list[dict]:
    out = []
    for row in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 9))]
        completion = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        top_ids, top_lps = topk_rows(rng, len(completion))
        p_ids, p_lps = topk_rows(rng, len(prompt), empty_first=True)
        top_lps[0][-1] = float("-inf")  # processed logprobs can be -inf
        out.append({"parquet_file": "gs://b/in.parquet", "row_idx": row, "prefix": f"prompt {row}",
                    "generated": f"completion {row} é", "prompt_token_ids": prompt, "completion_token_ids": completion,
                    "finish_reason": "length", "sample_idx": 0, "token_logprobs": [r[0] for r in top_lps],
                    "top_token_ids": top_ids, "top_logprobs": top_lps,
                    "prompt_token_logprobs": [None] + [r[0] for r in p_lps[1:]], "prompt_top_token_ids": p_ids,
                    "prompt_top_logprobs": p_lps, "sampling": {"logprobs_mode": "raw", "logprobs": K}})
    return out


def score_records(rng: random.Random, n: int = 4) -> list[dict]:
    out = []
    for row in range(n):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 15))]
        top_ids, top_lps = topk_rows(rng, len(ids), empty_first=True)
        nxt_ids, nxt_lps = topk_rows(rng, 1)
        out.append({"parquet_file": "in.parquet", "row_idx": row, "token_ids": ids,
                    "token_logprobs": [None] + [r[0] for r in top_lps[1:]], "segment_starts": [0],
                    "top_token_ids": top_ids, "top_logprobs": top_lps, "next_top_token_ids": nxt_ids,
                    "next_top_logprobs": nxt_lps})
    return out


def f16_close(a, b, tol: float = 2 ** -10) -> bool:
    """Nested lists equal within float16 precision (tol: relative, and absolute below 1)."""
    if isinstance(a, list):
        return len(a) == len(b) and all(f16_close(x, y, tol) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    if math.isinf(b):
        return a == b
    return abs(a - b) <= tol * max(1.0, abs(b))


def read_all(path: str, cols: list[str]) -> dict[str, list[list]]:
    """{reader: rows as lists of the columns' values} from every reader."""
    import datasets
    import duckdb
    import polars as pl
    import pyarrow.parquet as pq

    got = {"duckdb": [list(r) for r in duckdb.sql(f"SELECT {', '.join(cols)} FROM read_parquet('{path}')").fetchall()],
           "polars": [[r[c] for c in cols] for r in pl.read_parquet(path).to_dicts()],
           "pyarrow": [[r[c] for c in cols] for r in pq.read_table(path).to_pylist()]}
    ds = datasets.load_dataset("parquet", data_files=path, split="train")
    got["datasets"] = [[r[c] for c in cols] for r in ds]
    return got


def check(path: str, records: list[dict], cols: list[str]) -> None:
    for reader, rows in read_all(path, cols).items():
        assert len(rows) == len(records), reader
        for row, rec in zip(rows, records):
            for c, v in zip(cols, row):
                assert f16_close(v, rec[c]) if "logprobs" in c else v == rec[c], (reader, c)


@pytest.mark.parametrize("kind", ["generation", "score"])
def test_chunk_objects_read_by_every_reader(tmp_path, kind):
    rng = random.Random(5)
    records = generation_records(rng) if kind == "generation" else score_records(rng)
    path = str(tmp_path / "chunk.parquet")
    with open(path, "wb") as f:
        f.write(parquet_codec.encode_parquet(records))
    cols = [c for c in records[0] if c in parquet_codec.TYPES and c not in ("parquet_file", "prefix", "generated")]
    assert any(c.endswith("top_logprobs") for c in cols)
    check(path, records, cols)


def test_export_shards_read_by_every_reader(tmp_path):
    """The parquet export (one schema per job, a row group per chunk object) and the messages
    export with TRL's prompt / completion columns."""
    rng = random.Random(6)
    records = generation_records(rng)
    fp = {"task": "generate", "logprobs": K, "prompt_logprobs": True, "output_format": "sequence_kd",
          "prompt_mode": "chat"}
    path = str(tmp_path / "records-00000.parquet")
    assert shards.write_rows(path, [records[:3], records[3:]], "parquet", shards.record_columns(fp)) == 6
    check(path, records, ["row_idx", "completion_token_ids", "top_token_ids", "top_logprobs", "prompt_top_token_ids",
                          "prompt_top_logprobs"])
    msgs = [shards.messages_row(r, fp) for r in records]
    path = str(tmp_path / "messages-00000.parquet")
    shards.write_rows(path, [msgs], "parquet", ["messages", "prompt", "completion", "parquet_file", "row_idx",
                                                "sample_idx"], parquet_codec.EXPORT_TYPES["chat"])
    check(path, msgs, ["messages", "prompt", "completion", "row_idx"])


def test_no_float16_column_uses_byte_stream_split(tmp_path):
    """DuckDB refuses float16 BYTE_STREAM_SPLIT: the logprob columns stay PLAIN, the int32 ids split."""
    import pyarrow.parquet as pq

    path = str(tmp_path / "c.parquet")
    with open(path, "wb") as f:
        f.write(parquet_codec.encode_parquet(generation_records(random.Random(7))))
    meta = pq.ParquetFile(path).metadata
    encodings = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
                 for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" not in encodings["top_logprobs.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["top_token_ids.list.element.list.element"]


def test_bytes_per_token_within_a_fifth_of_jsonl():
    """Parquet <= 1/5 of JSONL per token at k=20 with ids of a 128k vocabulary (bench/logit_kd.py
    measures the same on a real job)."""
    records = generation_records(random.Random(8), n=40)
    for r in records:  # only the completion's top-k, as bench/logit_kd.py's job
        for k in writer.PROMPT_LOGPROB_KEYS:
            del r[k]
    ratio = len(parquet_codec.encode_parquet(records)) / len(writer.encode_jsonl(records))
    assert ratio <= 0.2, ratio


if __name__ == "__main__":
    pytest.main([os.path.abspath(__file__)])


def test_conversations_with_prompt_topk_round_trip_parquet():
    """Conversations keep the top-k (and, with PROMPT_LOGPROBS, the ids) in metadata; parquet stores
    them in typed columns and gives the same record back."""
    g = generation_records(random.Random(9), n=2)
    recs = []
    for i, r in enumerate(g):
        meta = {"parquet_file": "f", "idx": i, "sample_idx": 0, **{k: r[k] for k in (
            "token_logprobs", "top_token_ids", "top_logprobs", "prompt_token_logprobs", "prompt_top_token_ids",
            "prompt_top_logprobs", "prompt_token_ids", "completion_token_ids")}}
        recs.append({"id": f"f-{i}", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                     "metadata": meta})
    back = parquet_codec.decode_parquet(parquet_codec.encode_parquet(recs))
    for a, b in zip(back, recs):
        assert a["conversations"] == b["conversations"] and a["id"] == b["id"]
        for k, v in b["metadata"].items():
            assert f16_close(a["metadata"][k], v) if "logprobs" in k else a["metadata"][k] == v, k


@pytest.mark.parametrize("kind", ["generation", "score"])
def test_jsonl_chunk_objects_read_by_every_reader(tmp_path, kind):
    """JSONL chunk objects (raw logprobs: finite) through DuckDB, polars and `datasets`. Processed
    logprobs may hold -inf, written as -Infinity: DuckDB and `datasets` read it, polars refuses it."""
    import datasets
    import duckdb
    import polars as pl

    rng = random.Random(10)
    records = generation_records(rng) if kind == "generation" else score_records(rng)
    for r in records:
        for row in r["top_logprobs"]:
            row[:] = [-30.0 if math.isinf(v) else v for v in row]
    path = str(tmp_path / "chunk.jsonl")
    with open(path, "wb") as f:
        f.write(writer.encode_jsonl(records))
    col = "top_logprobs"
    got = {"duckdb": [r[0] for r in duckdb.sql(f"SELECT {col} FROM read_json_auto('{path}')").fetchall()],
           "polars": pl.read_ndjson(path)[col].to_list(),
           "datasets": list(datasets.load_dataset("json", data_files=path, split="train")[col])}
    for reader, values in got.items():  # JSON text -> float64: the last bit may differ
        assert f16_close(values, [r[col] for r in records], 1e-12), reader
    records[0]["top_logprobs"][-1][-1] = float("-inf")
    with open(path, "wb") as f:
        f.write(writer.encode_jsonl(records))
    assert duckdb.sql(f"SELECT {col} FROM read_json_auto('{path}')").fetchall()[0][0][-1][-1] == float("-inf")
    with pytest.raises(Exception, match="InvalidNumber"):
        pl.read_ndjson(path)

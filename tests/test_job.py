"""The generation job end to end on the real vLLM CPU engine (one engine for the session)."""

from __future__ import annotations

import collections
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import tiny
from kdgen.records import parquet_codec
from kdgen.worker import runner
from kdgen.records import chunk_object, naming
from kdgen.corpus.jobfile import FingerprintMismatch
from tests.conftest import job_config


def chunk_urls(out: str) -> list[str]:
    """The chunk objects in OUT (either file format), by name."""
    return [os.path.join(out, n) for n in sorted(os.listdir(out)) if naming.parse_object_name(n)]


def read_records(out: str) -> list[dict]:
    """Every record of every chunk object; conversations keep their failed rows (metadata.error)."""
    records = []
    for url in chunk_urls(out):
        if url.endswith(".parquet"):
            lines = parquet_codec.decode_parquet(open(url, "rb").read())
        else:
            lines = [json.loads(line) for line in open(url)]
        records += [r for r in lines if "error" not in r]
    return records


def read_errors(out: str) -> list[dict]:
    """The failed rows, as the chunk objects hold them."""
    return [e for url in chunk_urls(out) for e in chunk_object.read_chunk_object(url)[1]]


def coverage(records) -> collections.Counter:
    return collections.Counter((os.path.basename(r["parquet_file"]), r["row_idx"], r["sample_idx"]) for r in records)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("corpus"))
    tiny.make_corpus(d, num_files=3, rows_per_file=50, row_group_size=16)
    return d


def test_every_row_exactly_once(engine, tiny_model, corpus, tmp_path):
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=corpus, output_path=out)
    s = runner.run(c, engine=engine)
    records = read_records(out)
    cov = coverage(records)
    want = {(f"shard-{f:05d}.parquet", r, 0) for f in range(3) for r in range(50)}
    assert set(cov) == want and set(cov.values()) == {1}
    assert s.chunks_committed == 9 and s.rows == 150 and s.error_rows == 0
    r = records[0]  # the first line of a JSONL chunk object also states the object's hash (chunk_object.HASH_KEY)
    assert set(r) == {"parquet_file", "row_idx", "prefix", "generated", "prompt_token_ids",
                      "completion_token_ids", "finish_reason", "sample_idx", chunk_object.HASH_KEY}
    assert all(chunk_object.HASH_KEY not in x for x in records[1:20])
    assert 0 < len(r["prompt_token_ids"]) <= 32
    assert len(r["completion_token_ids"]) <= 48 - len(r["prompt_token_ids"])
    names = sorted(n for n in os.listdir(out) if n.endswith(".jsonl"))
    assert names[0] == "shard-00000_rows_0000000_0000020.jsonl"
    job = json.load(open(os.path.join(out, "_job.json")))
    assert job["fingerprint"]["chunk_size"] == 20


def test_greedy_parity_with_raw_vllm(engine, tiny_model, corpus, tmp_path):
    from vllm import SamplingParams

    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=corpus, output_path=out, limit=60)
    runner.run(c, engine=engine)
    records = sorted(read_records(out), key=lambda r: (r["parquet_file"], r["row_idx"]))
    assert len(records) == 60
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in records]
    params = [SamplingParams(temperature=0.0, max_tokens=48 - len(r["prompt_token_ids"])) for r in records]
    raw = engine.llm.generate(prompts, params, use_tqdm=False)
    for r, o in zip(records, raw):
        assert r["completion_token_ids"] == list(o.outputs[0].token_ids)
        assert r["generated"] == o.outputs[0].text.strip()


def test_prefix_has_no_bos_and_is_truncated(engine, tiny_model, tokenizer, corpus, tmp_path):
    out = str(tmp_path / "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=corpus, output_path=out, limit=20,
                          max_prefill_length=8, max_target_length=16), engine=engine)
    table = pq.read_table(os.path.join(corpus, "shard-00000.parquet"))
    texts = table.column("text").to_pylist()
    for r in read_records(out):
        full = tokenizer(texts[r["row_idx"]], add_special_tokens=False)["input_ids"]
        assert r["prompt_token_ids"] == full[:8]
        assert tokenizer.bos_token_id not in r["prompt_token_ids"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_skips_finished_chunks_and_refuses_changed_settings(engine, tiny_model, corpus, tmp_path, fmt):
    out = str(tmp_path / "out")
    settings = dict(model_path=tiny_model, dataset_path=corpus, output_path=out, output_file_format=fmt)
    first = runner.run(job_config(max_chunks=3, **settings), engine=engine)
    assert first.chunks_committed == 3
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if naming.parse_object_name(n)}
    assert len(before) == 3 and all(n.endswith("." + fmt) for n in before)
    second = runner.run(job_config(**settings), engine=engine)
    assert second.chunks_done_before == 3 and second.chunks_committed == 6
    after = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before}
    assert after == before  # finished chunks were not regenerated
    cov = coverage(read_records(out))
    assert len(cov) == 150 and set(cov.values()) == {1}
    third = runner.run(job_config(**settings), engine=engine)
    assert third.chunks_committed == 0
    with pytest.raises(FingerprintMismatch, match="temperature"):
        runner.run(job_config(**{**settings, "temperature": 0.5}), engine=engine)
    other = "jsonl" if fmt == "parquet" else "parquet"
    with pytest.raises(FingerprintMismatch, match="output_file_format"):  # no mix of formats in one OUT
        runner.run(job_config(**{**settings, "output_file_format": other}), engine=engine)


def test_samples_and_logprobs(engine, tiny_model, corpus, tmp_path):
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=corpus, output_path=out, limit=10,
                   num_samples=3, temperature=1.0, logprobs=2)
    runner.run(c, engine=engine)
    records = read_records(out)
    cov = coverage(records)
    assert len(records) == 30 and set(cov.values()) == {1}
    assert {r["sample_idx"] for r in records} == {0, 1, 2}
    for r in records:
        n = len(r["completion_token_ids"])
        assert len(r["token_logprobs"]) == len(r["top_token_ids"]) == len(r["top_logprobs"]) == n
        assert all(len(t) == 2 for t in r["top_token_ids"])
        for lps in r["top_logprobs"]:
            assert lps[0] >= lps[1] and all(lp <= 0 for lp in lps)


def test_chat_mode_with_system_prompt(engine, tiny_model, tokenizer, tmp_path):
    data = tmp_path / "chat"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["Write a poem about the river.", "What is a token?"]}),
                   str(data / "chat.parquet"))
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=str(data), output_path=out, prompt_mode="chat",
                   system_prompt="You are a teacher.", max_target_length=120)
    runner.run(c, engine=engine)
    records = sorted(read_records(out), key=lambda r: r["row_idx"])
    expect = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a teacher."}, {"role": "user", "content": "What is a token?"}],
        tokenize=False, add_generation_prompt=True)
    assert records[1]["prompt_token_ids"] == tokenizer(expect, add_special_tokens=False)["input_ids"]
    assert records[1]["prompt_token_ids"].count(tokenizer.bos_token_id) == 1
    assert records[0]["prefix"] == "Write a poem about the river."


def test_bad_rows_are_recorded_not_dropped(engine, tiny_model, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    long_text = " ".join(["river"] * 800)
    pq.write_table(pa.table({"text": ["A fine row.", None, "", "   ", long_text, "Another row."]}),
                   str(data / "rows.parquet"))
    out = str(tmp_path / "out")
    # chat mode: an 800-word prompt does not fit max_model_len 512 and must become an error record.
    chat = job_config(model_path=tiny_model, dataset_path=str(data), output_path=out, prompt_mode="chat",
                      prompt_column="text", max_target_length=600)
    s = runner.run(chat, engine=engine)
    errors = {e["row_idx"]: e["error"] for e in read_errors(out)}
    assert set(errors) == {1, 2, 3, 4}
    assert errors[1] == "text is null" and "empty" in errors[2] and "empty" in errors[3]
    assert "model allows at most 511" in errors[4]
    assert {r["row_idx"] for r in read_records(out)} == {0, 5}
    assert s.error_rows == 4 and s.rows == 2


def test_whole_chunk_of_errors_still_commits(engine, tiny_model, tmp_path):
    data = tmp_path / "nulls"
    data.mkdir()
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string())}), str(data / "n.parquet"))
    out = str(tmp_path / "out")
    s = runner.run(job_config(model_path=tiny_model, dataset_path=str(data), output_path=out), engine=engine)
    assert s.chunks_committed == 1 and s.error_rows == 2
    assert chunk_object.read_chunk_object(os.path.join(out, "n_rows_0000000_0000002.jsonl"))[0] == []
    assert len(read_errors(out)) == 2

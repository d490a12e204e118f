"""Scoring mode: prompt logprobs of texts and prompt/completion pairs, checked against transformers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kdgen
from kdgen import tiny
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.cli.main import main as cli_main
from tests.conftest import job_config
from tests.test_job import read_records

TOL = 1e-3


def check_against_hf(rec: dict, hf_logprobs, k: int) -> None:
    """Each segment scored on its own: logprobs and top-k of every position, and the top-k after
    the segment's last token, equal to LlamaForCausalLM's log-softmax on that segment alone."""
    ids, lps = rec["token_ids"], rec["token_logprobs"]
    starts = rec["segment_starts"]
    assert len(lps) == len(ids) and starts[0] == 0
    for j, (s, e) in enumerate(zip(starts, starts[1:] + [len(ids)])):
        ref = hf_logprobs(ids[s:e])
        assert lps[s] is None
        for t in range(s + 1, e):
            assert abs(lps[t] - ref[t - s - 1, ids[t]].item()) < TOL, (t, lps[t], ref[t - s - 1, ids[t]].item())
        if not k:
            continue
        assert rec["top_token_ids"][s] == []
        rows = [(rec["top_token_ids"][t], rec["top_logprobs"][t], ref[t - s - 1]) for t in range(s + 1, e)]
        rows.append((rec["next_top_token_ids"][j], rec["next_top_logprobs"][j], ref[e - s - 1]))
        for top_ids, top_lps, ref_row in rows:
            top = ref_row.topk(k)
            assert max(abs(a - b) for a, b in zip(top_lps, top.values.tolist())) < TOL
            # ids agree except where two logprobs tie within the tolerance
            for tid, v in zip(top_ids, top_lps):
                assert abs(ref_row[tid].item() - v) < TOL


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("score")
    import random

    rng = random.Random(7)
    rows = [tiny.paragraph(rng, rng.randint(1, 4)) for _ in range(12)]
    rows[5] = ""
    pq.write_table(pa.table({"text": rows, "completion": [tiny.sentence(rng, 6) for _ in rows]}), d / "s.parquet")
    return str(d / "s.parquet")


def test_score_texts_equal_transformers_and_resume(engine, tiny_model, texts, tmp_path, hf_logprobs):
    out = str(tmp_path / "out")
    # MAX_TARGET_LENGTH 24: longer texts are cut into segments of 24 tokens, each scored alone.
    c = job_config(model_path=tiny_model, dataset_path=texts, output_path=out, task="score", logprobs=3,
                   add_bos=True, chunk_size=5, max_prefill_length=8, max_target_length=24)
    s = runner.run(c, engine=engine)
    assert s.rows == 11 and s.error_rows == 1 and s.chunks_committed == 3
    records = sorted(read_records(out), key=lambda r: r["row_idx"])
    assert [r["row_idx"] for r in records] == [i for i in range(12) if i != 5]
    assert any(len(r["segment_starts"]) > 2 for r in records)
    assert all(r["segment_starts"] == list(range(0, len(r["token_ids"]), 24)) for r in records)
    for rec in records:
        assert rec["token_ids"][0] == engine.llm.get_tokenizer().bos_token_id
        check_against_hf(rec, hf_logprobs, 3)
    report = audit.audit(out)
    assert report["ok"] and report["rows_failed"] == 1
    again = runner.run(c, engine=engine)  # resume: nothing left to do
    assert again.chunks_committed == 0 and again.chunks_done_before == 3


def test_score_chat_pairs_span_and_endpoint(engine, tiny_model, texts, tmp_path, hf_logprobs, vllm_server):
    settings = dict(model_path=tiny_model, dataset_path=texts, task="score", prompt_mode="chat",
                    prompt_column="completion", completion_column="text", logprobs=0, limit=6)
    out = str(tmp_path / "out")
    runner.run(job_config(output_path=out, **settings), engine=engine)
    local = {r["row_idx"]: r for r in read_records(out)}
    assert sorted(local) == [0, 1, 2, 3, 4]  # row 5 has an empty completion
    for rec in local.values():
        check_against_hf(rec, hf_logprobs, 0)
        assert "top_token_ids" not in rec
        start, end = rec["completion_start"], rec["completion_end"]
        assert 0 < start < end == len(rec["token_ids"])
        assert abs(rec["completion_logprob"] - sum(rec["token_logprobs"][start:])) < 1e-6
    # The same through the server (vLLM's prompt_logprobs on /v1/completions), via the CLI.
    ep_out = str(tmp_path / "ep")
    flags = [f"--{k}={v}" for k, v in settings.items() if k != "task"]
    cli_main(["score", *flags, f"--output_path={ep_out}", f"--endpoint={vllm_server.url}", "--dtype=float32",
              "--chunk_size=20"])
    remote = {r["row_idx"]: r for r in read_records(ep_out)}
    assert sorted(remote) == sorted(local)
    for i, rec in remote.items():
        assert rec["token_ids"] == local[i]["token_ids"]
        assert max(abs(a - b) for a, b in zip(rec["token_logprobs"][1:], local[i]["token_logprobs"][1:])) < TOL
        assert rec["metadata"]["latency_s"] > 0
    assert audit.audit(ep_out)["ok"]


def test_score_texts_python_api(engine, tiny_model, hf_logprobs):
    out = kdgen.score_texts(["The quick brown fox.", "A small garden."], engine=engine, logprobs=2)
    for rec in out:
        check_against_hf(rec, hf_logprobs, 2)
    pairs = kdgen.score_texts(pairs=[("Question: river?", " The river is long.")], engine=engine)
    assert pairs[0]["completion_end"] == len(pairs[0]["token_ids"])

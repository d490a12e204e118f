"""Logit KD on the real CPU engine: top-k logprobs in both file formats against raw
LLM.generate, and LOGPROBS_MODE raw vs processed against the model's own logits."""

from __future__ import annotations

import json
import os

import pytest

from kdgen import storage, tiny
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.records import naming
from kdgen.corpus import jobfile
from tests.conftest import job_config
from tests.test_job import read_records

F16 = 2 ** -10  # float16 keeps 11 significant bits: relative error <= 2**-11, and some slack


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("lp-corpus"))
    tiny.make_corpus(d, num_files=2, rows_per_file=20, seed=11)
    return d


def near(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_greedy_logprobs_equal_raw_generate(engine, tiny_model, corpus, tmp_path, fmt):
    from vllm import SamplingParams

    from kdgen.engines.vllm_engine import convert_logprobs

    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=corpus, output_path=out, logprobs=5,
                   output_file_format=fmt)
    s = runner.run(c, engine=engine)
    assert s.rows == 40 and s.chunks_committed == 2
    assert all(n.endswith("." + fmt) for n in os.listdir(out) if naming.parse_object_name(n))
    records = sorted(read_records(out), key=lambda r: (r["parquet_file"], r["row_idx"]))
    # Raw vLLM on the same prompt ids, its defaults (per-position dicts, detokenized logprobs).
    raw = engine.llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in records],
                              [SamplingParams(temperature=0.0, logprobs=5, max_tokens=48 - len(r["prompt_token_ids"]))
                               for r in records], use_tqdm=False)
    tol = F16 if fmt == "parquet" else 1e-5
    for r, o in zip(records, raw):
        ids = list(o.outputs[0].token_ids)
        assert r["completion_token_ids"] == ids
        assert r["generated"] == o.outputs[0].text.strip()  # our own decoding (detokenize=False)
        want_lp, want_ids, want_top = convert_logprobs(ids, o.outputs[0].logprobs, 5)
        assert len(r["top_token_ids"]) == len(ids) and all(len(t) == 5 for t in r["top_token_ids"])
        for t in range(len(ids)):
            assert near(r["token_logprobs"][t], want_lp[t], tol)
            for a, b in zip(r["top_logprobs"][t], want_top[t]):
                assert near(a, b, tol)
            if r["top_token_ids"][t] != want_ids[t]:  # only a tie may reorder ids
                assert sorted(r["top_token_ids"][t]) == sorted(want_ids[t])
        assert r["sampling"] == {"logprobs_mode": "raw", "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                 "logprobs": 5}
    job = json.loads(storage.read_bytes(storage.join(out, jobfile.JOB_FILE)))
    assert job["layout"]["file_format"] == fmt and job["layout"]["sampling"]["logprobs_mode"] == "raw"
    assert audit.audit(out)["ok"]


def test_raw_vs_processed_logprobs_at_temperature_07(engine, sampling_engine, tiny_model, corpus, tmp_path,
                                                      hf_logprobs):
    """vLLM: raw = log-softmax of the model's logits; processed = after temperature (and top-k/p),
    i.e. log-softmax(logits / T). Checked position by position against LlamaForCausalLM, on an
    engine of each mode; the processed engine also takes k = 25 (> vLLM's default cap of 20)."""
    settings = dict(model_path=tiny_model, dataset_path=corpus, temperature=0.7, limit=6, max_target_length=40)
    raw_out, proc_out = str(tmp_path / "raw"), str(tmp_path / "processed")
    runner.run(job_config(output_path=raw_out, logprobs=5, **settings), engine=engine)
    pc = job_config(output_path=proc_out, logprobs=25, logprobs_mode="processed", **settings)
    runner.run(pc, engine=sampling_engine)
    for out, k, temp in ((raw_out, 5, 1.0), (proc_out, 25, 0.7)):
        records = read_records(out)
        assert len(records) == 6
        mode = "raw" if temp == 1.0 else "processed"
        job = json.loads(storage.read_bytes(storage.join(out, jobfile.JOB_FILE)))
        assert job["layout"]["sampling"]["logprobs_mode"] == mode
        assert job["fingerprint"].get("logprobs_mode", "raw") == mode
        for r in records:
            assert r["sampling"]["logprobs_mode"] == mode and r["sampling"]["temperature"] == 0.7
            ids = r["prompt_token_ids"] + r["completion_token_ids"]
            ref = hf_logprobs(ids, temperature=temp)
            n = len(r["prompt_token_ids"])
            for t, tid in enumerate(r["completion_token_ids"]):
                row = ref[n + t - 1]
                assert abs(r["token_logprobs"][t] - row[tid].item()) < 1e-3, (mode, t)
                top = row.topk(k)
                assert len(r["top_logprobs"][t]) == k
                assert max(abs(a - b) for a, b in zip(r["top_logprobs"][t], top.values.tolist())) < 1e-3, (mode, t)
    # The two differ as documented: at T = 0.7 the processed distribution is the sharper one.
    raw_top1 = [lp[0] for r in read_records(raw_out) for lp in r["top_logprobs"]]
    proc_top1 = [lp[0] for r in read_records(proc_out) for lp in r["top_logprobs"]]
    assert sum(proc_top1) / len(proc_top1) > sum(raw_top1) / len(raw_top1)


def test_engine_settings_for_logprobs():
    from kdgen.engines.vllm_engine import engine_logprobs_kwargs, sampling_kwargs

    c = job_config(model_path="m", dataset_path="d", output_path="o", logprobs=64, logprobs_mode="processed")
    assert engine_logprobs_kwargs(c) == {"logprobs_mode": "processed_logprobs", "max_logprobs": 64}
    kw = sampling_kwargs(c)
    assert kw["logprobs"] == 64 and kw["flat_logprobs"] and kw["detokenize"] is False
    assert "detokenize" not in sampling_kwargs(job_config(model_path="m", dataset_path="d", output_path="o",
                                                          logprobs=5, stop="</s>"))  # stop strings need text
    assert engine_logprobs_kwargs(job_config(model_path="m", dataset_path="d", output_path="o"))["max_logprobs"] == 20

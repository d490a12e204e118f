"""bench/frontend.py without an engine: the slope arithmetic, and the replay mode driving kdgen's
whole job (with the stage wrappers on), so that the bench cannot rot silently when kdgen moves."""

from __future__ import annotations

import os

import pytest

from bench import frontend
from kdgen import config as config_mod, prompts, tiny
from kdgen.worker import runner
from kdgen.records import chunk_object, naming
from kdgen.engines.base import Finished, Sample


def test_slope_cancels_fixed_costs():
    fixed, per_token = 3.0, 40e-6  # 3 s of start-up, 40 us per token
    small = frontend.Run(fixed + 1000 * per_token, 1000, 0.0)
    large = frontend.Run(fixed + 3000 * per_token, 3000, 0.0)
    assert frontend.slope_us(small, large) == pytest.approx(40.0)
    with pytest.raises(ValueError):
        frontend.slope_us(large, small)


def fake_ids(prompt_ids: list[int]) -> list[int]:
    """A recorded completion: 3..10 tokens made from the prompt's own ids."""
    return [(t * 7 + 1) % 500 for t in prompt_ids[: 3 + len(prompt_ids) % 8]]


def fake_finished(p, k: int) -> Finished:
    ids = fake_ids(p.token_ids)
    s = Sample(0, ids, f"text {ids[0]}", "length", token_logprobs=[-0.5] * len(ids),
               top_token_ids=[[t, t + 1][:k] for t in ids], top_logprobs=[[-0.5, -1.5][:k] for _ in ids])
    return Finished("recorded", [s])


def test_replay_drives_kdgens_job(tmp_path):
    tok_dir = str(tmp_path / "tok")
    tiny.make_tokenizer(tok_dir)
    tok = prompts.load_tokenizer(tok_dir)
    sizes = [32, 64]
    data = {}
    for size in sizes:
        data[size] = str(tmp_path / f"data-{size}")
        tiny.make_corpus(data[size], num_files=2, rows_per_file=size // 2, seed=1)

    def make_job(size, fmt="parquet", out="out"):
        return config_mod.from_sources(dict(
            model_path=tok_dir, dataset_path=data[size], output_path=str(tmp_path / f"{out}-{size}-{fmt}"),
            temperature=0.0, logprobs=2, output_file_format=fmt, max_prefill_length=16,
            max_target_length=48, chunk_size=16, log_every_s=1e9), env={})

    recorded = {}
    for size in sizes:
        for p in frontend.job_prompts(make_job(size), tok, 512):
            recorded.setdefault((tuple(p.token_ids), p.max_tokens), []).append(fake_finished(p, 2))

    # The replay engine hands kdgen's job exactly the recorded outputs (a few sequences at a time).
    for fmt in ("jsonl",):  # the replay below runs parquet
        c = make_job(sizes[0], fmt)
        summary = runner.run(c, engine=frontend.ReplayEngine(recorded, max_num_seqs=8), tokenizer=tok)
        got = {}
        for name in os.listdir(c.output_path):
            if naming.parse_object_name(name):
                records, errors = chunk_object.read_chunk_object(os.path.join(c.output_path, name))
                assert not errors
                got.update({(r["parquet_file"], r["row_idx"]): r for r in records})
        assert len(got) == sizes[0]
        for r in got.values():
            want = fake_ids(r["prompt_token_ids"])
            assert r["completion_token_ids"] == want
            assert r["top_token_ids"] == [[t, t + 1] for t in want]
        assert summary.generated_tokens == sum(len(r["completion_token_ids"]) for r in got.values())

    # The bench's replay: slope per token, and the stage map still finds every kdgen function it wraps.
    class EngineShape:
        max_num_seqs, max_model_len = 16, 512

    def run_kdgen(c, engine):
        return runner.run(c, engine=engine, tokenizer=tok).generated_tokens

    outs = iter(range(100))
    r = frontend.replay(lambda size: make_job(size, out=f"r{next(outs)}"), sizes, recorded, EngineShape(),
                        run_kdgen, rounds=1)
    assert len(r["rounds_us"]) == 1  # its value at these few tokens is noise
    stages = r["stages"]["stages_us"]
    for stage in (frontend.REPLAY_STEP, frontend.PUMP, frontend.PROMPTS, frontend.RECORDS, frontend.ENCODE,
                  frontend.COMMIT):
        assert stage in stages, stage
    assert r["stages"]["large"]["stage_cpu_s"][frontend.ENCODE] > 0
    frontend.print_stages("replay", r["stages"])

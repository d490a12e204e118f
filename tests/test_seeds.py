"""Reproducible sampling: each row's request carries a seed from (SEED, file, row), so a chunk made
again (a resume, a tail copy, other chunk boundaries) draws the same completions at temperature > 0."""

from __future__ import annotations

import os

from kdgen import tiny
from kdgen.worker import runner
from kdgen.engines.pool import request_seed
from tests.conftest import job_config
from tests.test_job import read_records


def completions(out: str) -> dict:
    return {(os.path.basename(r["parquet_file"]), r["row_idx"], r["sample_idx"]): r["completion_token_ids"]
            for r in read_records(out)}


def test_request_seed_depends_on_seed_file_and_row():
    seeds = {request_seed(s, stem, row) for s in (0, 1) for stem in ("a", "b") for row in range(50)}
    assert len(seeds) == 200 and all(0 <= x < 2 ** 56 for x in seeds)
    assert request_seed(0, "a", 3) == request_seed(0, "a", 3)


def test_equal_seed_gives_equal_completions_at_temperature(sampling_engine, tiny_model, tmp_path):
    corpus = str(tmp_path / "corpus")
    tiny.make_corpus(corpus, num_files=2, rows_per_file=40, seed=12)
    settings = dict(model_path=tiny_model, dataset_path=corpus, temperature=0.9, num_samples=2,
                    max_target_length=64)
    eng = sampling_engine  # started for sampling: on the CPU platform without chunked prefill
    runner.run(job_config(output_path=str(tmp_path / "a"), chunk_size=10, **settings), engine=eng)
    assert eng.seeded
    # Other chunk boundaries and a request pool twice as full: other batches, same rows.
    runner.run(job_config(output_path=str(tmp_path / "b"), chunk_size=7, gen_batch_size=128, **settings), engine=eng)
    runner.run(job_config(output_path=str(tmp_path / "c"), chunk_size=10, seed=1, **settings), engine=eng)
    a, b, other = (completions(str(tmp_path / d)) for d in "abc")
    assert len(a) == 160 and a == b
    assert sum(a[k] == other[k] for k in a) < 16  # SEED changes the draws
    assert sum(a[(f, r, 0)] == a[(f, r, 1)] for f, r, _ in a) < 16  # samples of a row differ


def test_an_engine_with_chunked_prefill_sends_no_seeds_on_cpu(engine):
    """The session engine was started for greedy jobs: on the CPU platform chunked prefill is on,
    so it never gets per-request seeds (they would kill it)."""
    from kdgen.engines.vllm_engine import seeds_need_whole_prefills, seeds_unsafe

    assert seeds_need_whole_prefills()  # this machine runs vLLM's CPU platform
    assert "chunked prefill is on" in seeds_unsafe(engine.llm)
    engine.set_sampling(job_config(model_path="m", dataset_path="d", output_path="o", temperature=0.9))
    try:
        assert not engine.seeded and engine.params(8, seed=5).seed is None
    finally:
        engine.set_sampling(job_config(model_path="m", dataset_path="d", output_path="o"))

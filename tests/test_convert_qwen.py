"""MaxText Qwen3 dense checkpoints -> HF Qwen3ForCausalLM, on real Orbax checkpoints (tiny shapes).

The family is found from the leaves (q/k norm scales). Logits of the converted model
(transformers' Qwen3ForCausalLM) are compared with converters.reference's numpy forward of the
MaxText parameterisation (q/k RMSNorm per head before RoPE, q x head_dim**-0.5 after it).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tests import convert_fixtures as cf
from tests.test_convert import PROMPT, hf_logits, rel, verify

# head_dim 64: the vLLM CPU kernels' shapes; H*D = 128 = E here, K = 1 (GQA)
QWEN = dict(emb=128, layers=2, heads=2, kv_heads=1, head_dim=64, mlp=256, family="qwen3")

LAYOUTS = {  # name: (spec kind and options, layout, root)
    "q_train_scanned": (dict(kind="train", scanned=True, teacher=True), "linen", ("params", "params")),
    "q_nnx_unscanned": (dict(kind="nnx", scanned=False, dtype="bfloat16"), "nnx", ()),
    "q_tunix_list": (dict(kind="tunix", scanned=False, layers_list=True), "tunix", ("base",)),
    "q_params_zarr2": (dict(kind="params", scanned=True, zarr2=True), "linen", ("params", "params")),
    "q_tied": (dict(kind="nnx", scanned=True, tied=True), "nnx", ()),
}


@pytest.fixture(scope="module")
def qx(tmp_path_factory):
    from kdgen import tiny

    root = str(tmp_path_factory.mktemp("convert-qwen"))
    tok = tiny.make_tokenizer(os.path.join(root, "tok"))
    specs = [dict(name=n, dims=dict(QWEN, vocab=512), seed=20 + i, **kw)
             for i, (n, (kw, _, _)) in enumerate(LAYOUTS.items())]
    items = cf.build(os.path.join(root, "ck"), specs)
    return {"dir": root, "tok": tok, "items": items, "specs": {s["name"]: s for s in specs}}


def convert(qx, name, out=None, **kw):
    from converters.convert import convert as run

    kw = {"dtype": "float32", "tokenizer": qx["tok"], **kw}
    out = out or os.path.join(qx["dir"], "hf", f"{name}-{kw['dtype']}")
    return out, run(qx["items"][name], out, **{"overwrite": True, "quiet": True, **kw})


def truth(qx, name):
    return cf.load_truth(os.path.join(qx["dir"], "ck"), name)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_qwen3_layouts_match_the_maxtext_forward_and_transformers(qx, name):
    """Each layout is read as Qwen3 from its leaves alone; with no convention flag (MaxText's Qwen3
    path pins them) the converted Qwen3ForCausalLM's logits equal the MaxText forward's."""
    import torch
    from transformers import AutoModelForCausalLM

    from converters import reference
    from converters.orbax_reader import Checkpoint
    from converters.sizes import Dims

    ck = Checkpoint(qx["items"][name])
    assert ck.family == "qwen3" and (ck.layout, ck.root) == LAYOUTS[name][1:]
    out, s = convert(qx, name)
    assert s["conventions"]["query_scale"] == "none" and s["conventions"]["rope_layout"] == "half"
    assert not [k for k in s["opened"] if "opt_state" in k or "teacher_params" in k or "rngs" in k]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["model_type"], cfg["architectures"], cfg["rms_norm_eps"], cfg["rope_theta"]) == (
        "qwen3", ["Qwen3ForCausalLM"], 1e-6, 1e6)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(m).__name__ == "Qwen3ForCausalLM"
    t = truth(qx, name)
    d = Dims(**s["dims"])
    p = cf.truth_as_reference(t)
    assert "query_norm" in p["layers"][0]
    ref = reference.forward(p, PROMPT, d, "none", "none", "half", normalize_embedding_logits=False)
    got = hf_logits(out)
    assert rel(got, ref) < 1e-4
    # the q/k norms matter: the same weights without them are far off
    bare = {**p, "layers": [{k: v for k, v in layer.items() if k not in cf.QK_NORMS} for layer in p["layers"]]}
    assert rel(got, reference.forward(bare, PROMPT, d, "none", "none", "half", False)) > 1e-2
    if name == "q_train_scanned":  # orbax's own restore agrees with the reader
        params, _ = reference.load_params(qx["items"][name])
        np.testing.assert_array_equal(params["layers"]["query_norm"], np.moveaxis(t["query_norm"], 0, 1))


def test_qwen3_refuses_a_folded_query_scale(qx, tmp_path):
    from converters import ConvertError

    with pytest.raises(ConvertError, match=r"--query-scale fold: this is a Qwen3 checkpoint \(q/k norms\), whose "
                                           r"query scale MaxText never folds"):
        convert(qx, "q_train_scanned", out=str(tmp_path / "o"), query_scale="fold")
    with pytest.raises(ConvertError, match=r"--model-size qwen3-0.6b expects vocab=151936 but the checkpoint"):
        convert(qx, "q_train_scanned", out=str(tmp_path / "o"), model_size="qwen3-0.6b")
    with pytest.raises(ConvertError, match=r"--model-size llama3.1-8b expects family=llama but the checkpoint .* has "
                                           r"family=qwen3"):
        convert(qx, "q_train_scanned", out=str(tmp_path / "o"), model_size="llama3.1-8b")
    assert os.listdir(tmp_path) == []


def test_qwen3_sizes_follow_maxtext():
    from converters.sizes import SIZES

    s = SIZES["qwen3-32b"]
    assert (s.dims.emb, s.dims.layers, s.dims.heads, s.dims.kv_heads, s.dims.head_dim, s.dims.mlp) == (
        5120, 64, 64, 8, 128, 25600)
    assert (s.dims.family, s.rope_layout, s.rope_scaling, s.normalize, s.dims.rope_theta) == (
        "qwen3", "half", "none", "false", 1e6)
    assert SIZES["qwen3-0.6b"].dims.vocab == 151936


def test_qwen3_tied_head_without_normalization(qx):
    """qwen3-0.6b/1.7b/4b: logits_via_embedding with normalize_embedding_logits false: lm_head is the
    bf16-rounded embedding, not divided by sqrt(E)."""
    import ml_dtypes
    from safetensors.numpy import load_file

    out, s = convert(qx, "q_tied")
    assert s["conventions"]["normalize"] == "false"
    w = load_file(os.path.join(out, "model-00001-of-00001.safetensors"))
    emb = truth(qx, "q_tied")["embedding"]
    np.testing.assert_array_equal(w["lm_head.weight"], emb.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.engine  # a vLLM engine in a subprocess
def test_qwen3_served_by_vllm_like_transformers(qx):
    """Real vLLM CPU engine (hold /tmp/kdgen-engine.lock): greedy tokens equal transformers'."""
    out, _ = convert(qx, "q_train_scanned")
    rc, lines, text = verify("--model-path", out, "--vllm", "--vllm-tokens", "12", "--no-language-check")
    assert any(ln.startswith("PASS vllm: 4/4") for ln in lines), text
    assert any(ln.startswith("PASS transformers: Qwen3ForCausalLM loads") for ln in lines), text
    assert rc == 3 and [ln.split(":")[0] for ln in lines if not ln.startswith("PASS")] == [
        "SKIP language", "INCONCLUSIVE conventions"], text  # random weights: conventions cannot be judged


# --- conventions of a trained Qwen3: auto and the verifier ------------------------------------

TRAINED = {  # name: (rope layout, tied, normalize_embedding_logits) it was written with
    "qt_half": ("half", False, None),  # MaxText's own qwen3 rule; Linen train state, scanned
    "qt_int": ("interleaved", False, None),  # a fork with interleaved RoPE; NNX, unscanned
    "qt_tied": ("half", True, False),  # qwen3-0.6b-like: tied head, normalize_embedding_logits false
}


@pytest.fixture(scope="module")
def qt(tmp_path_factory):
    """A tiny Qwen3 (q/k norms) trained for a few seconds, written in each convention."""
    root = str(tmp_path_factory.mktemp("convert-qwen-trained"))
    hf = cf.train_tiny_llama(qk_norm=True)
    wtok = cf.make_word_tokenizer(os.path.join(root, "wtok"))
    probe = os.path.join(root, "probe.txt")
    with open(probe, "w") as f:
        f.write(cf.probe_text())
    dims = dict(cf.TINY, family="qwen3")
    specs = []
    for name, (layout, tied, normalize) in TRAINED.items():
        npz = os.path.join(root, f"{name}-params.npz")
        np.savez(npz, **cf.to_maxtext(hf, "none", layout, tied=tied, normalize=normalize is not False))
        kind = {"qt_half": dict(kind="train", scanned=True), "qt_int": dict(kind="nnx", scanned=False),
                "qt_tied": dict(kind="nnx", scanned=True, tied=True)}[name]
        specs.append(dict(name=name, dims=dims, params_npz=npz, **kind))
    items = cf.build(os.path.join(root, "ck"), specs)
    return {"dir": root, "tok": wtok, "probe": probe, "items": items}


def check_auto_picks(fx: dict, name: str, layout: str, tied: bool, **kw) -> None:
    """Convert trained checkpoint `name` of fixture fx with auto, then with the true convention
    given explicitly: auto must name it, and both outputs must be byte for byte equal."""
    from converters.convert import convert as run

    kw = dict(tokenizer=fx["tok"], dtype="float32", quiet=True, overwrite=True, **kw)
    extra = dict(normalize_embedding_logits="auto") if tied else {}
    out = os.path.join(fx["dir"], "auto", name)
    s = run(fx["items"][name], out, rope_layout="auto", probe_text=fx["probe"], **extra, **kw)
    want = {"query_scale": "none", "rope_layout": layout, "rope_scaling": "none"}
    if tied:
        want["normalize"] = "false"
    assert s["conventions"] == want, s["losses"]
    assert len(s["losses"]) == (4 if tied else 2)
    explicit = os.path.join(fx["dir"], "explicit", name)
    run(fx["items"][name], explicit, rope_layout=layout, **kw)
    for f in ("model-00001-of-00001.safetensors", "config.json"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(explicit, f), "rb").read(), f


@pytest.mark.parametrize("name", list(TRAINED))
def test_auto_finds_the_convention_of_a_trained_qwen3(qt, name):
    """auto (rotary layout, and the tied head's normalization) picks the convention each trained
    Qwen3 was written with; the output is byte for byte the explicit conversion's."""
    layout, tied, _ = TRAINED[name]
    check_auto_picks(qt, name, layout, tied)


def test_verifier_judges_a_trained_qwen3(qt, capsys):
    """The right conversion passes (rope scaling taken as stated); the wrong rotary layout fails."""
    from converters.convert import convert as run
    from tests.test_convert import verify_stdout

    kw = dict(tokenizer=qt["tok"], dtype="float32", quiet=True, overwrite=True)
    right = os.path.join(qt["dir"], "v-right")
    wrong = os.path.join(qt["dir"], "v-wrong")
    run(qt["items"]["qt_int"], right, rope_layout="interleaved", **kw)
    run(qt["items"]["qt_int"], wrong, rope_layout="half", **kw)
    rc, text = verify_stdout(capsys, "--model-path", right, "--probe-text", qt["probe"], "--accept", "rope_scaling")
    assert rc == 0 and "PASS conventions" in text, text
    rc, text = verify_stdout(capsys, "--model-path", wrong, "--probe-text", qt["probe"])
    assert rc == 1 and "FAIL conventions: none/interleaved/none is clearly better than the converted none/half/none" \
        in text, text


# --- Qwen3 MoE ------------------------------------------------------------------------------------

MOE_DIMS = dict(emb=64, layers=2, heads=2, kv_heads=1, head_dim=64, mlp=48, family="qwen3_moe", experts=4)
MOE_LAYOUTS = {  # a few experts, top-2; every layout the Llama and dense Qwen3 tests read: (spec, layout, root)
    "m_train_scanned": (dict(kind="train", scanned=True, teacher=True), "linen", ("params", "params")),
    "m_train_unscanned": (dict(kind="train", scanned=False, zarr2=True), "linen", ("params", "params")),
    "m_params_zarr2": (dict(kind="params", scanned=True, zarr2=True), "linen", ("params", "params")),
    "m_params_unscanned": (dict(kind="params", scanned=False, dtype="bfloat16"), "linen", ("params", "params")),
    "m_nnx_unscanned": (dict(kind="nnx", scanned=False, dtype="bfloat16"), "nnx", ()),
    "m_nnx_scanned_zarr2": (dict(kind="nnx", scanned=True, zarr2=True), "nnx", ()),
    "m_tunix_list": (dict(kind="tunix", scanned=False, layers_list=True), "tunix", ("base",)),
    "m_tunix_scanned": (dict(kind="tunix", scanned=True, zarr2=True), "tunix", ("base",)),
    "m_tied": (dict(kind="nnx", scanned=True, tied=True), "nnx", ()),
}


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    from kdgen import tiny

    root = str(tmp_path_factory.mktemp("convert-qwen-moe"))
    tok = tiny.make_tokenizer(os.path.join(root, "tok"))
    specs = [dict(name=n, dims=dict(MOE_DIMS, vocab=512), seed=40 + i, **kw) for i, (n, (kw, _, _)) in
             enumerate(MOE_LAYOUTS.items())]
    items = cf.build(os.path.join(root, "ck"), specs)
    return {"dir": root, "tok": tok, "items": items}


@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_qwen3_moe_matches_the_maxtext_forward_and_transformers(mx, name):
    """Router top-2 / softmax over the k / norm_topk_prob as layers/moe.py does, experts as
    mlp.experts.{j}.*: Qwen3MoeForCausalLM's logits equal the MaxText forward's."""
    import torch
    from transformers import AutoModelForCausalLM

    from converters import reference
    from converters.orbax_reader import Checkpoint
    from converters.sizes import Dims

    ck = Checkpoint(mx["items"][name])
    assert ck.family == "qwen3_moe" and (ck.layout, ck.root) == MOE_LAYOUTS[name][1:]
    from converters import ConvertError
    from converters.convert import convert as run

    out = os.path.join(mx["dir"], "hf", name)
    with pytest.raises(ConvertError, match=r"--experts-per-token is required for a Qwen3 MoE checkpoint \(4 experts\)"):
        run(mx["items"][name], out, tokenizer=mx["tok"], dtype="float32", quiet=True)
    s = run(mx["items"][name], out, tokenizer=mx["tok"], dtype="float32", quiet=True, experts_per_token=2,
            max_shard_size="100KB")
    assert not [k for k in s["opened"] if "opt_state" in k or "teacher_params" in k or "rngs" in k]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["model_type"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["norm_topk_prob"]) == ("qwen3_moe", 4, 2, 48, True)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(m).__name__ == "Qwen3MoeForCausalLM"
    d = Dims(**s["dims"])
    p = cf.truth_as_reference(cf.load_truth(os.path.join(mx["dir"], "ck"), name))
    ref = reference.forward(p, PROMPT, d, "none", "none", "half", False)
    with torch.no_grad():
        got = m(torch.tensor([PROMPT])).logits[0].double().numpy()
    assert rel(got, ref) < 1e-4
    # top-1 routing would be another model: the test can tell
    assert rel(got, reference.forward(p, PROMPT, dict_replace(d, experts_per_token=1), "none", "none", "half",
                                      False)) > 1e-2
    # The probe's streaming forward (auto, and the verifier's conventions check) routes the same way:
    # its loss equals transformers' loss of the converted model.
    from safetensors.torch import load_file

    from converters import conventions, probe

    w = {}
    for f in set(json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"].values()):
        w.update({k: v.float().numpy() for k, v in load_file(os.path.join(out, f)).items()})
    seq = PROMPT[:32]
    c = conventions.Convention("none", "half", "none")
    got_loss = probe.losses(lambda n, rows: w[n] if rows is None else w[n][rows], set(), d, [seq], [c], False)[c]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(m(torch.tensor([seq])).logits[0, :-1], torch.tensor(seq[1:])).item()
    assert abs(got_loss - want) < 1e-3


@pytest.mark.parametrize("name", ["m_train_scanned", "m_tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_beyond_the_block_budget_are_decoded_slab_by_slab(mx, name, dtype):
    """With no block budget every zarr3 chunk of the expert kernels and the embedding is decoded as a
    zstd stream, slab by slab (converters/chunk_stream.py), as a huge stored chunk is: the model
    written is byte for byte the one tensorstore's whole-chunk reads make, also where float32 leaves
    are cast to bfloat16."""
    from converters import chunk_stream
    from converters.convert import convert as run
    from converters.orbax_reader import Checkpoint

    ck = Checkpoint(mx["items"][name])
    st = ck.store("moe_wi_0")
    idx = tuple(slice(0, c) for c in st.chunk_layout.read_chunk.shape)
    assert chunk_stream.streamable(st, idx, ()) is None
    axis = chunk_stream.split_axis(tuple(s.stop - s.start for s in idx))
    got = np.concatenate([a for _, a in chunk_stream.slabs(st, idx, 1)], axis=axis)
    np.testing.assert_array_equal(got, st[idx].read().result())
    # the expert kernels and the embedding (mapping.SLAB_LEAVES), every stored chunk of them
    grids = [(ck.shape(n), ck.store(n).chunk_layout.read_chunk.shape) for n in ("moe_wi_0", "moe_wi_1", "moe_wo",
                                                                                  "embedding")]
    chunks = sum(math.prod(-(-s // c) for s, c in zip(shape, chunk)) for shape, chunk in grids)
    outs = []
    for block_mb in (64, 0):
        out = os.path.join(mx["dir"], "hf", f"{name}-{dtype}-block{block_mb}")
        s = run(mx["items"][name], out, tokenizer=mx["tok"], dtype=dtype, quiet=True, experts_per_token=2,
                overwrite=True, block_mb=block_mb)
        assert s["streamed_chunks"] == (chunks if block_mb == 0 else 0), s["streamed_chunks"]
        outs.append(out)
    files = sorted(f for f in os.listdir(outs[0]) if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(outs[1]) if f.endswith(".safetensors"))
    for f in files:
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read(), f


def dict_replace(d, **kw):
    import dataclasses

    return dataclasses.replace(d, **kw)


MOE_TRAINED = {  # name: (rope layout, tied, spec) a trained tiny Qwen3 MoE was written with
    "mt_half": ("half", False, dict(kind="train", scanned=True)),  # MaxText's own qwen3 rule
    "mt_int": ("interleaved", False, dict(kind="nnx", scanned=False)),  # a fork with interleaved RoPE
    "mt_tied": ("half", True, dict(kind="nnx", scanned=True, tied=True)),  # tied, normalize_embedding_logits false
}


@pytest.fixture(scope="module")
def mt(tmp_path_factory):
    """A tiny Qwen3 MoE (q/k norms, 4 experts, top-2) trained for a few seconds, in each convention."""
    root = str(tmp_path_factory.mktemp("convert-qwen-moe-trained"))
    hf = cf.train_tiny_llama(qk_norm=True, experts=4, top_k=2)
    wtok = cf.make_word_tokenizer(os.path.join(root, "wtok"))
    probe = os.path.join(root, "probe.txt")
    with open(probe, "w") as f:
        f.write(cf.probe_text())
    dims = dict(cf.TINY, family="qwen3_moe", experts=4)
    specs = []
    for name, (layout, tied, kind) in MOE_TRAINED.items():
        npz = os.path.join(root, f"{name}-params.npz")
        np.savez(npz, **cf.to_maxtext(hf, "none", layout, tied=tied, normalize=not tied))
        specs.append(dict(name=name, dims=dims, params_npz=npz, **kind))
    items = cf.build(os.path.join(root, "ck"), specs)
    return {"dir": root, "tok": wtok, "probe": probe, "items": items}


@pytest.mark.parametrize("name", list(MOE_TRAINED))
def test_auto_finds_the_convention_of_a_trained_qwen3_moe(mt, name):
    """auto (rotary layout, and the tied head's normalization) picks the convention each trained
    Qwen3 MoE was written with, routing top-2 in its probe; the output is byte for byte the
    explicit conversion's."""
    layout, tied, _ = MOE_TRAINED[name]
    check_auto_picks(mt, name, layout, tied, experts_per_token=2)

"""MaxText Orbax -> HF converter and verify_model.py, on real Orbax checkpoints (tiny Llama-3.1 shapes).

The checkpoints are written by tests/convert_fixtures.py in one 8-device subprocess, the way
MaxText writes them; the ground truth is the numpy params they were made from. Logits of the
converted HF model (transformers) are compared with converters.reference's independent numpy
forward of the MaxText parameterisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests import convert_fixtures as cf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFY = os.path.join(REPO, "scripts", "data_generation", "verify_model.py")
PY = sys.executable
PROMPT = [(i * 37 + 11) % 512 for i in range(48)]

WIDE = dict(emb=96, layers=3, heads=4, kv_heads=2, head_dim=64, mlp=192)  # H*D = 256 != E
VLLM = dict(emb=128, layers=2, heads=2, kv_heads=1, head_dim=64, mlp=256)  # shapes the vLLM CPU kernels take


TRUE_CONVENTIONS = {  # trained fixtures: the convention each was written with, and its layout
    "t_fold_int": ("fold", "interleaved"),   # Linen train state, scanned, extra top-level keys
    "t_none_int": ("none", "interleaved"),   # NNX param-only (/value leaves), bf16, scanned
    "t_fold_half": ("fold", "half"),         # Tunix: model_params item, base/ root, layers/{i}
    "t_none_half": ("none", "half"),         # Linen params-only, zarr v2 without use_zarr3, layers_{i}
}


@pytest.fixture(scope="session")
def tiny_trained():
    """A tiny Llama trained for a few seconds (HF layout, numpy): shared by the whole session."""
    return cf.train_tiny_llama()


@pytest.fixture(scope="module")
def cx(tmp_path_factory, tiny_trained):
    """Tokenizers + checkpoints: {'dir', 'tok', 'wtok', 'probe', 'vocab', 'items': {name: path}, 'specs'}."""
    from transformers import AutoTokenizer

    from kdgen import tiny

    root = str(tmp_path_factory.mktemp("convert"))
    tok = tiny.make_tokenizer(os.path.join(root, "tok"))
    vocab = len(AutoTokenizer.from_pretrained(tok))
    assert vocab == 512
    wtok = cf.make_word_tokenizer(os.path.join(root, "wtok"))
    probe = os.path.join(root, "probe.txt")
    with open(probe, "w") as f:
        f.write(cf.probe_text())
    npz = {}
    for name, (qs, layout) in [*TRUE_CONVENTIONS.items(), ("t_tied", ("fold", "interleaved"))]:
        npz[name] = os.path.join(root, f"{name}-params.npz")
        np.savez(npz[name], **cf.to_maxtext(tiny_trained, qs, layout, tied=name == "t_tied"))
    t = dict(cf.TINY)
    specs = [
        dict(name="train_scanned", dims=dict(WIDE, vocab=vocab), scanned=True, teacher=True, seed=1),
        dict(name="train_unscanned", dims=dict(WIDE, vocab=vocab), scanned=False, teacher=True, seed=2),
        dict(name="params_bf16", dims=dict(VLLM, vocab=vocab), scanned=True, kind="params",
             dtype="bfloat16", sharded=False, seed=3),
        dict(name="missing_leaf", dims=dict(VLLM, vocab=vocab), scanned=False, kind="params", seed=4,
             drop=["decoder", "layers_1", "mlp", "wo", "kernel"]),
        dict(name="t_fold_int", dims=t, scanned=True, kind="train", teacher=True, params_npz=npz["t_fold_int"]),
        dict(name="t_none_int", dims=t, scanned=True, kind="nnx", dtype="bfloat16", params_npz=npz["t_none_int"]),
        dict(name="t_fold_half", dims=t, scanned=False, kind="tunix", layers_list=True,
             params_npz=npz["t_fold_half"]),
        dict(name="t_none_half", dims=t, scanned=False, kind="params", zarr2=True, params_npz=npz["t_none_half"]),
        dict(name="t_tied", dims=t, scanned=True, kind="nnx", tied=True, params_npz=npz["t_tied"]),
        dict(name="random", dims=t, scanned=True, kind="nnx", seed=11),
        dict(name="tied", dims=dict(WIDE, vocab=vocab), scanned=True, kind="nnx", tied=True, seed=12),
        dict(name="qwen3", dims=t, scanned=True, kind="params", seed=13,  # a key_norm without its query_norm
             extra=[[["decoder", "layers", "self_attention", "key_norm", "scale"], [t["head_dim"], t["layers"]]]]),
        dict(name="bias", dims=t, scanned=False, kind="nnx", seed=14,
             extra=[[["decoder", "layers_0", "self_attention", "query", "bias"], [t["heads"], t["head_dim"]]]]),
    ]
    items = cf.build(os.path.join(root, "ck"), specs)
    return {"dir": root, "tok": tok, "wtok": wtok, "probe": probe, "vocab": vocab, "items": items,
            "specs": {s["name"]: s for s in specs}}


def truth(cx, name):
    return cf.load_truth(os.path.join(cx["dir"], "ck"), name)


def convert(cx, name, out=None, **kw):
    from converters.convert import convert as run

    tok = cx["wtok"] if cx["specs"][name]["dims"]["vocab"] == cf.TINY["vocab"] else cx["tok"]
    kw = {"query_scale": "fold", "rope_scaling": "none", "rope_layout": "interleaved", "dtype": "float32",
          "tokenizer": tok, **kw}
    out = out or os.path.join(cx["dir"], "hf", f"{name}-{kw['query_scale']}-{kw['rope_layout']}-"
                                                f"{kw['rope_scaling']}-{kw['dtype']}")
    s = run(kw.pop("checkpoint", cx["items"][name]), out, **{"overwrite": True, "quiet": True, **kw})
    return out, s


def hf_logits(path, tokens=PROMPT):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = [t % m.config.vocab_size for t in tokens]
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].double().numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def verify(*args, timeout=400):
    p = subprocess.run([PY, VERIFY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    lines = [ln for ln in p.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP", "INCONCLUSIVE")]
    return p.returncode, lines, p.stdout + "\n--- stderr ---\n" + p.stderr


# --- reading ---------------------------------------------------------------------------------


def test_reader_reads_params_only_from_sharded_train_state(cx):
    from converters.orbax_reader import LAYER_LEAVES, Checkpoint

    t = truth(cx, "train_scanned")
    ck = Checkpoint(cx["items"]["train_scanned"], block_bytes=1)  # one stored chunk per block
    assert ck.scanned and ck.root == ("params", "params") and ck.num_layers == 3
    for leaf in LAYER_LEAVES:
        got = np.zeros(ck.shape(leaf), np.float32)
        n = 0
        for origin, block in ck.blocks(leaf):
            got[tuple(slice(o, o + s) for o, s in zip(origin, block.shape))] = block
            n += 1
        assert n > 1, f"{leaf}: the 8-device save should have stored several chunks"
        np.testing.assert_array_equal(got, np.moveaxis(t[leaf], 0, 1))
    np.testing.assert_array_equal(ck.read("embedding"), t["embedding"])
    assert ck.opened and not [k for k in ck.opened if "opt_state" in k or "teacher_params" in k]

    u = Checkpoint(os.path.dirname(cx["items"]["train_unscanned"]))  # the step dir works too
    assert not u.scanned and u.num_layers == 3
    np.testing.assert_array_equal(u.read("wo", 2), truth(cx, "train_unscanned")["wo"][2])


def test_reader_params_only_bf16(cx):
    import ml_dtypes

    from converters.orbax_reader import Checkpoint

    ck = Checkpoint(cx["items"]["params_bf16"])
    assert ck.dtype("query") == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ck.read("query").astype(np.float32),
                                  np.moveaxis(truth(cx, "params_bf16")["query"], 0, 1))


def test_block_shape_follows_the_chunk_grid():
    from converters.orbax_reader import block_shape

    # Chunks of [128, 12, 8192] f32 (50 MB): never cut, grown along the last axes first.
    assert block_shape((1024, 12, 8192), (128, 12, 8192), (), 4, 64 << 20) == (128, 12, 8192)
    assert block_shape((1024, 12, 8192), (128, 12, 8192), (), 4, 256 << 20) == (512, 12, 8192)
    assert block_shape((1024, 12, 8192), (128, 12, 4096), (), 4, 64 << 20) == (128, 12, 8192)
    # D split in storage but needed whole (RoPE de-interleave).
    assert block_shape((96, 3, 4, 64), (24, 3, 2, 32), (3,), 4, 1) == (24, 3, 2, 64)
    assert block_shape((5,), (8,), (), 4, 1) == (5,)


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("buffer_bytes", [0, 1 << 20])  # stripes through file maps / assembled in memory
def test_writer_places_strided_pieces(tmp_path, buffer_bytes, direct_io):
    import torch
    from safetensors.torch import load_file

    from converters.safetensors_out import ShardedSafetensors

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 72)).astype(np.float32)
    b = rng.standard_normal((72,)).astype(np.float32)
    w = ShardedSafetensors(str(tmp_path), [("a", (300, 72), 0), ("b", (72,), 1)], "bfloat16", 40_000,
                           band_bytes=1000, buffer_bytes=buffer_bytes, direct_io=direct_io)  # 6 rows per band
    src = np.ascontiguousarray(a.T)  # write transposed column blocks, like lm_head from logits_dense
    for c in range(0, 72, 16):
        w.write("a", (slice(0, 300), slice(c, min(c + 16, 72))), src[c:c + 16].T)
    w.write("b", (slice(0, 72),), b)
    idx = w.finish()
    got = load_file(str(tmp_path / idx["weight_map"]["a"]))
    assert len(w.files) == 2 and got["a"].dtype == torch.bfloat16
    np.testing.assert_array_equal(got["a"].float().numpy(), torch.from_numpy(a).bfloat16().float().numpy())


def test_writer_direct_io_writes_the_same_bytes(tmp_path, monkeypatch):
    """O_DIRECT (aligned middles; unaligned ends through the page cache; unaligned memory through a
    bounce buffer) writes the very bytes the page-cache path writes."""
    import ml_dtypes

    from converters import file_writes, safetensors_out

    monkeypatch.setattr(file_writes, "DIRECT_MIN", 4096)
    monkeypatch.setattr(file_writes, "BOUNCE_BYTES", 3 * 4096)
    rng = np.random.default_rng(1)
    tensors = [("n", (37,), 0), ("a", (301, 200), 0), ("b", (200, 301), 0), ("c", (50, 200), 1)]
    vals = {n: rng.standard_normal(s).astype(np.float32) for n, s, _ in tensors}
    files = {}
    for direct in (False, True):
        out = tmp_path / str(direct)
        out.mkdir()
        w = safetensors_out.ShardedSafetensors(str(out), tensors, "bfloat16", 1 << 30, buffer_bytes=1 << 20, direct_io=direct)
        assert (w.dfds.get(w.files[0]) is not None) == direct  # tmp_path's filesystem takes O_DIRECT
        w.write("n", (slice(0, 37),), vals["n"])
        for r in range(0, 301, 100):  # whole rows, already cast, at an odd address: the bounce buffer
            rows = vals["a"][r:r + 100].astype(ml_dtypes.bfloat16)
            odd = np.empty(rows.nbytes + 2, np.uint8)[2:].view(rows.dtype).reshape(rows.shape)
            odd[...] = rows
            w.write("a", (slice(r, r + rows.shape[0]), slice(0, 200)), odd)
        src = np.ascontiguousarray(vals["b"].T)  # column stripes assembled in an aligned buffer
        for c in range(0, 301, 64):
            w.write("b", (slice(0, 200), slice(c, min(c + 64, 301))), src[c:c + 64].T)
        w.write("c", (slice(0, 50), slice(0, 200)), vals["c"])
        w.finish()
        files[direct] = (out / w.files[0]).read_bytes()
    assert files[True] == files[False]


# --- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train_scanned", "train_unscanned"])
@pytest.mark.parametrize("query_scale", ["fold", "none"])
@pytest.mark.parametrize("rope_scaling", ["llama3", "none"])
def test_logits_match_the_maxtext_forward(cx, name, query_scale, rope_scaling):
    from converters import reference
    from converters.sizes import Dims

    out, s = convert(cx, name, query_scale=query_scale, rope_scaling=rope_scaling)
    assert not [k for k in s["opened"] if "opt_state" in k or "teacher_params" in k]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["head_dim"] == 64 and cfg["hidden_size"] == 96 and cfg["tie_word_embeddings"] is False
    assert ("rope_scaling" in cfg) == (rope_scaling == "llama3")
    d = Dims(**s["dims"])
    p = cf.truth_as_reference(truth(cx, name))
    ref = reference.forward(p, PROMPT, d, query_scale, rope_scaling)
    got = hf_logits(out)
    assert rel(got, ref) < 1e-4
    # The test can tell the choices apart: every wrong one is far off.
    other_q = {"fold": "none", "none": "fold"}[query_scale]
    other_r = {"llama3": "none", "none": "llama3"}[rope_scaling]
    assert rel(got, reference.forward(p, PROMPT, d, other_q, rope_scaling)) > 1e-2
    assert rel(got, reference.forward(p, PROMPT, d, query_scale, other_r)) > 1e-3


def test_bf16_params_only_to_bf16_is_exact(cx):
    import torch
    from safetensors.torch import load_file

    from converters import reference
    from converters.sizes import Dims

    out, s = convert(cx, "params_bf16", query_scale="fold", rope_scaling="llama3", dtype="bfloat16",
                     max_shard_size="150KB", block_mb=0)
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(idx["weight_map"].values())) > 1  # sharded output, a layer per shard
    t = truth(cx, "params_bf16")
    w = {}
    for f in set(idx["weight_map"].values()):
        w.update(load_file(os.path.join(out, f)))
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    f32 = {k: v.float().numpy() for k, v in w.items()}
    np.testing.assert_array_equal(f32["model.layers.1.mlp.down_proj.weight"], t["wo"][1].T)
    np.testing.assert_array_equal(f32["lm_head.weight"], t["logits"].T)
    q = t["query"][0]  # [E, H, D], x8 (= sqrt(64), exact in bf16), de-interleaved
    q = np.concatenate([q[..., 0::2], q[..., 1::2]], -1) * 8
    np.testing.assert_array_equal(f32["model.layers.0.self_attn.q_proj.weight"], q.reshape(128, -1).T)
    ref = reference.forward(cf.truth_as_reference(t), PROMPT, Dims(**s["dims"]), "fold", "llama3")
    assert rel(hf_logits(out), ref) < 1e-4


def test_float32_to_bfloat16_rounds_like_numpy(cx):
    """Leaves without arithmetic are cast by tensorstore while decoding: the same bits as ml_dtypes."""
    import ml_dtypes
    from safetensors.torch import load_file

    out, _ = convert(cx, "train_scanned", dtype="bfloat16")
    w = load_file(os.path.join(out, "model-00001-of-00001.safetensors"))
    t = truth(cx, "train_scanned")
    bits = lambda a: a.astype(ml_dtypes.bfloat16).view(np.uint16)  # noqa: E731
    got = lambda n: w[n].view(dtype=__import__("torch").int16).numpy().view(np.uint16)  # noqa: E731
    np.testing.assert_array_equal(got("model.layers.2.mlp.down_proj.weight"), bits(t["wo"][2].T))
    np.testing.assert_array_equal(got("lm_head.weight"), bits(t["logits"].T))
    np.testing.assert_array_equal(got("model.embed_tokens.weight"), bits(t["embedding"]))


def test_block_size_does_not_change_the_output(cx):
    a, _ = convert(cx, "train_scanned", out=os.path.join(cx["dir"], "blk-a"), block_mb=0)
    b, _ = convert(cx, "train_scanned", out=os.path.join(cx["dir"], "blk-b"), block_mb=512)
    f = "model-00001-of-00001.safetensors"
    assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read()


@pytest.mark.parametrize("name,kw", [
    ("train_unscanned", dict(query_scale="fold", rope_layout="interleaved")),  # shards upload as they complete
    ("t_none_half", dict(query_scale="auto", rope_layout="auto")),  # zarr v2 over gcs; uploads after the probe
])
def test_gcs_in_and_out(cx, gcs_server, monkeypatch, name, kw):
    """gs:// checkpoint (tensorstore's gcs driver) -> gs:// model dir (gcsfs), same bytes as local."""
    from converters import storage

    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_server.endpoint)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anon")
    kw = dict(kw, rope_scaling="none", dtype="float32", max_shard_size="100KB", probe_text=cx["probe"])
    local, _ = convert(cx, name, out=os.path.join(cx["dir"], f"gcs-local-{name}"), **kw)
    step = os.path.basename(os.path.dirname(cx["items"][name]))
    fs, ck = storage.filesystem(gcs_server.url("ckpt", name, step, "items"))
    fs.put(cx["items"][name], ck, recursive=True)
    url = gcs_server.url("models", f"hf-{name}")
    from converters.convert import convert as run

    tok = cx["wtok"] if name.startswith("t_") else cx["tok"]
    s = run(gcs_server.url("ckpt", name, step), url, tokenizer=tok, quiet=True, **kw)
    assert s["files"] > 2 and not s["scanned"]
    fs, p = storage.filesystem(url)
    names = sorted(os.path.basename(x) for x in fs.ls(p, detail=False))
    assert names == sorted(os.listdir(local))
    for n in names:
        if n != "kdgen_convert.json":  # it names the source checkpoint
            assert fs.cat_file(f"{p}/{n}") == open(os.path.join(local, n), "rb").read(), n


# --- verifier and CLI ------------------------------------------------------------------------


def test_cli_convert_then_verify_against_the_checkpoint(cx, capsys):
    out = os.path.join(cx["dir"], "cli-out")
    items = cx["items"]["train_scanned"]
    p = subprocess.run([PY, "-m", "converters.cli", "convert", "--checkpoint", items, "--out", out,
                        "--query-scale", "fold", "--rope-scaling", "llama3", "--rope-layout", "interleaved",
                        "--tokenizer", cx["tok"], "--dtype", "float32", "--max-shard-size", "500KB"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["files"] > 1
    # Random weights: no language check, and the conventions cannot be judged (INCONCLUSIVE, exit 3,
    # never PASS); the conventions come from the model dir's kdgen_convert.json.
    rc, lines, text = verify_inproc(capsys, "--model-path", out, "--reference", items, "--no-language-check")
    assert rc == 3, text
    assert [ln.split(":")[0] for ln in lines] == [
        "PASS config", "PASS generation_config", "PASS tokenizer", "PASS index", "PASS tensors", "PASS finite",
        "PASS transformers", "SKIP language", "PASS reference", "INCONCLUSIVE conventions"], text
    assert "cannot judge: no convention predicts" in text
    assert "query_scale=fold rope_layout=interleaved rope_scaling=llama3" in text
    # A claim that contradicts the weights is caught.
    rc, lines, text = verify_inproc(capsys, "--model-path", out, "--reference", items, "--query-scale", "none",
                                    "--no-language-check")
    assert rc == 1 and any(ln.startswith("FAIL reference") for ln in lines), text
    assert text.split("--- stderr ---")[0].strip().splitlines()[-1] == "FAILED: reference; INCONCLUSIVE: conventions"


@pytest.mark.engine  # a vLLM engine in a subprocess
def test_vllm_serves_the_converted_model_like_transformers(cx):
    out, _ = convert(cx, "params_bf16", query_scale="none", rope_scaling="none", dtype="float32")
    rc, lines, text = verify("--model-path", out, "--vllm", "--vllm-tokens", "12", "--no-language-check")
    assert rc == 3, text  # random weights: the conventions cannot be judged, everything else passes
    assert [ln.split(":")[0] for ln in lines if not ln.startswith("PASS")] == ["SKIP language",
                                                                               "INCONCLUSIVE conventions"], text
    assert any(ln.startswith("PASS vllm: 4/4") for ln in lines), text


def verify_stdout(capsys, *args):
    """verify_model.py in this process: (rc, its stdout)."""
    rc, out, _ = run_verify_script(capsys, *args)
    return rc, out


def run_verify_script(capsys, *args):
    """verify_model.py's main in this process (the script as a subprocess: test_verify_subcommand_is_the_script)."""
    spec = importlib.util.spec_from_file_location("verify_model", VERIFY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def verify_inproc(capsys, *args):
    """Like verify() (rc, result lines, stdout + stderr), without a subprocess's torch/transformers import."""
    rc, out, err = run_verify_script(capsys, *args)
    lines = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP", "INCONCLUSIVE")]
    return rc, lines, out + "\n--- stderr ---\n" + err


def test_verifier_catches_broken_dirs(cx, tmp_path, capsys):
    good, _ = convert(cx, "train_unscanned", max_shard_size="300KB")
    rc, out = verify_stdout(capsys, "--model-path", str(tmp_path))
    assert rc == 1 and "FAIL config" in out and "not a HF model dir" in out

    files = sorted(set(json.load(open(os.path.join(good, "model.safetensors.index.json")))["weight_map"].values()))
    assert len(files) > 2
    missing = str(tmp_path / "missing")
    shutil.copytree(good, missing)
    os.remove(os.path.join(missing, files[1]))
    rc, out = verify_stdout(capsys, "--model-path", missing)
    assert rc == 1 and "FAIL index" in out and f"{files[1]} missing" in out

    nan = str(tmp_path / "nan")
    shutil.copytree(good, nan)
    f = os.path.join(nan, files[0])
    with open(f, "r+b") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        h = json.loads(fh.read(n))
        fh.seek(8 + n + h["model.embed_tokens.weight"]["data_offsets"][0])
        fh.write(np.array([np.nan], np.float32).tobytes())
    rc, out = verify_stdout(capsys, "--model-path", nan)
    assert rc == 1 and "FAIL finite" in out and "model.embed_tokens.weight" in out

    shape = str(tmp_path / "shape")
    shutil.copytree(good, shape)
    cfg = json.load(open(os.path.join(shape, "config.json")))
    cfg["intermediate_size"] = 200
    json.dump(cfg, open(os.path.join(shape, "config.json"), "w"))
    rc, out = verify_stdout(capsys, "--model-path", shape)
    assert rc == 1 and "FAIL tensors" in out and "wrong shapes" in out


def _corrupt(items: str, leaf: str, index: tuple, how: str) -> None:
    """Change one stored value of a leaf in place (tensorstore writes the chunk back into the ocdbt
    store): "inf"/"nan" turn the float32 exponent bits all on (mantissa cleared / kept), as flipped
    bytes do; "big" stores 1e6 (finite in float32, beyond float16's range)."""
    import tensorstore as ts

    from converters.orbax_reader import Checkpoint

    st = ts.open(Checkpoint(items).store(leaf).spec(), open=True, read=True, write=True).result()
    sl = tuple(slice(i, i + 1) for i in index)
    bits = st[sl].read().result().view(np.uint32)
    if how == "inf":
        bits = (bits & np.uint32(0x80000000)) | np.uint32(0x7F800000)
    elif how == "nan":
        bits = bits | np.uint32(0x7F800001)
    else:
        bits = np.full_like(bits, np.array(1e6, np.float32).view(np.uint32))
    st[sl].write(bits.view(np.float32)).result()


@pytest.mark.parametrize("leaf,index,how,dtype", [
    ("query", (5, 1, 2, 7), "inf", "float32"),  # arithmetic path (de-interleave, x sqrt(D))
    ("wo", (3, 2, 17), "nan", "bfloat16"),  # cast by tensorstore while reading, written without a copy
    ("wo", (3, 2, 17), "big", "float16"),  # finite in the checkpoint, Inf once cast
])
def test_nonfinite_values_are_refused_before_anything_is_published(cx, tmp_path, capsys, monkeypatch, leaf, index,
                                                                    how, dtype):
    """A checkpoint with flipped bytes (issue 19 item 16): the converter refuses with the leaf's
    name, exit 2, and --out is left as it was. The CLI's main runs in this process (its own process
    and one-line errors: test_cli_error_is_one_line)."""
    from converters import cli, safetensors_out

    items = str(tmp_path / "ck" / "7" / "items")
    shutil.copytree(cx["items"]["train_scanned"], items)
    _corrupt(items, leaf, index, how)
    out = tmp_path / "out"
    monkeypatch.setattr(safetensors_out, "tune_malloc", lambda: None)  # malloc settings for the CLI's process only
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "--checkpoint", items, "--out", str(out), "--query-scale", "fold", "--rope-scaling",
                  "none", "--rope-layout", "interleaved", "--tokenizer", cx["tok"], "--dtype", dtype])
    stderr = capsys.readouterr().err
    err = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    path = {"query": "self_attention/query/kernel", "wo": "mlp/wo/kernel"}[leaf]
    assert exit_.value.code == 2 and len(err) == 1, stderr
    assert err[0].startswith(f"error: checkpoint leaf params/params/decoder/layers/{path} holds NaN or Inf"), err
    assert "refusing to write the model" in err[0] and f"beyond --dtype {dtype}'s range" in err[0]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["ck"]


# --- clear errors ----------------------------------------------------------------------------


def test_error_wrong_model_size(cx):
    from converters import ConvertError

    with pytest.raises(ConvertError, match=r"--model-size llama3.1-1b expects vocab=128256 but the checkpoint "
                                           r".*train_scanned/7/items has vocab=512"):
        convert(cx, "train_scanned", model_size="llama3.1-1b")
    with pytest.raises(ConvertError, match="--model-size 'llama9' is unknown"):
        convert(cx, "train_scanned", model_size="llama9")


def test_error_not_orbax(cx, tmp_path):
    from converters import ConvertError

    (tmp_path / "model.bin").write_bytes(b"x")
    from converters.convert import convert as run

    with pytest.raises(ConvertError, match=f"--checkpoint {tmp_path} is not an Orbax checkpoint item dir"):
        run(str(tmp_path), str(tmp_path / "o"), query_scale="fold", rope_scaling="none", tokenizer=cx["tok"])
    with pytest.raises(ConvertError, match="no such file or directory"):
        run(str(tmp_path / "nope"), str(tmp_path / "o"), query_scale="fold", rope_scaling="none", tokenizer=cx["tok"])
    root = os.path.dirname(os.path.dirname(cx["items"]["train_scanned"]))  # the checkpoints dir
    with pytest.raises(ConvertError, match=r"holds steps \[7\]: pass .*/7/items"):
        run(root, str(tmp_path / "o"), query_scale="fold", rope_scaling="none", tokenizer=cx["tok"])
    state = tmp_path / "emergency" / "7" / "state"  # the emergency checkpoint manager's item name
    shutil.copytree(cx["items"]["t_fold_int"], state)
    _, s = convert(cx, "t_fold_int", out=str(tmp_path / "from-state"), checkpoint=str(state.parent))
    assert s["dims"]["layers"] == 2 and s["opened"][0].startswith("params/params/")
    tunix = os.path.dirname(os.path.dirname(cx["items"]["t_fold_half"]))  # Tunix names its item model_params
    with pytest.raises(ConvertError, match=r"holds steps \[3\]: pass .*/3/model_params"):
        run(tunix, str(tmp_path / "o"), query_scale="fold", rope_scaling="none", tokenizer=cx["tok"])
    assert not os.path.exists(tmp_path / "o")


def test_error_missing_leaf(cx):
    from converters import ConvertError

    with pytest.raises(ConvertError, match=r"is missing leaves: params/params/decoder/layers_1/mlp/wo/kernel"):
        convert(cx, "missing_leaf")


def test_error_tokenizer_vocab_mismatch(cx, tmp_path):
    from converters import ConvertError
    from kdgen import tiny

    small = tiny.make_tokenizer(str(tmp_path / "tok300"), vocab_size=300)
    with pytest.raises(ConvertError, match=r"--tokenizer .*tok300 has 300 tokens but the checkpoint's embedding "
                                           r"has 512 rows"):
        convert(cx, "train_scanned", tokenizer=small)


def test_error_options_are_required(cx, tmp_path):
    from converters import ConvertError

    with pytest.raises(ConvertError, match="--query-scale is required"):
        convert(cx, "train_scanned", query_scale=None)
    with pytest.raises(ConvertError, match=r"--query-scale must be one of fold\|none\|auto \(got 'sideways'\)"):
        convert(cx, "train_scanned", query_scale="sideways")
    with pytest.raises(ConvertError, match="--rope-scaling is required: llama3"):
        convert(cx, "train_scanned", rope_scaling=None)
    with pytest.raises(ConvertError, match="--rope-layout is required: interleaved"):
        convert(cx, "train_scanned", rope_layout=None)
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    from converters.convert import convert as run

    with pytest.raises(ConvertError, match="exists and is not empty"):
        run(cx["items"]["train_scanned"], str(out), query_scale="fold", rope_scaling="none", rope_layout="half",
            tokenizer=cx["tok"])


def test_cli_convert_flags_are_convert_parameters():
    """One flag per parameter of convert(), with its default (nothing to drift); the spellings the
    earlier fire CLI took (underscores, `--flag`, `--flag True/False`) still parse."""
    import inspect

    from converters import cli
    from converters.convert import convert as run

    params = {p.name: p.default for p in inspect.signature(run).parameters.values() if p.name not in cli.INTERNAL}
    args = cli.parser().parse_args(["convert", "--checkpoint", "ck", "--out", "o"])
    assert {k: v for k, v in vars(args).items() if k not in ("func", "command")} == {
        k: (None if v is inspect.Parameter.empty else v) for k, v in params.items()} | {"checkpoint": "ck", "out": "o"}
    argv = ["convert", "--checkpoint", "ck", "--out", "o", "--block_mb", "8", "--write_buffer_mb=64", "--overwrite",
            "--direct-io", "False", "--allow-vocab-padding", "True", "--query-scale", "FOLD", "--max-shard-size", "5MB"]
    args = cli.parser().parse_args(argv)
    assert (args.block_mb, args.write_buffer_mb, args.overwrite, args.direct_io, args.allow_vocab_padding,
            args.query_scale, args.max_shard_size) == (8, 64, True, False, True, "fold", "5MB")
    for bad in (["--rope-layout", "sideways"], ["--block", "8"]):  # not a choice; no abbreviations
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["convert", "--checkpoint", "ck", "--out", "o", *bad])


def test_verify_subcommand_is_the_script(tmp_path):
    """`kdgen-convert verify` and scripts/data_generation/verify_model.py are one verifier: same lines,
    same exit status."""
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = [subprocess.run(cmd + ["--model-path", str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=120) for cmd in ([PY, "-m", "converters.cli", "verify"], [PY, VERIFY])]
    assert [p.returncode for p in runs] == [1, 1], runs
    assert runs[0].stdout == runs[1].stdout and "FAIL config" in runs[0].stdout and "not a HF model dir" in runs[0].stdout


def test_cli_error_is_one_line(cx, tmp_path):
    p = subprocess.run([PY, "-m", "converters.cli", "convert", "--checkpoint", cx["items"]["train_scanned"],
                        "--out", str(tmp_path / "o"), "--model-size", "llama3.1-8b", "--query-scale", "fold",
                        "--rope-scaling", "none", "--tokenizer", cx["tok"]],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --model-size llama3.1-8b expects"), p.stderr
    p = subprocess.run([PY, "-m", "converters.cli", "convert", "--checkpoint", cx["items"]["qwen3"],
                        "--out", str(tmp_path / "q"), "--query-scale", "auto", "--rope-layout", "auto",
                        "--rope-scaling", "none", "--tokenizer", cx["wtok"]],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1 and "key_norm without its partner" in err[0], p.stderr
    assert not (tmp_path / "q").exists()


# --- every layout MaxText writes, tied embeddings, refusals ----------------------------------

LAYOUTS = {"t_fold_int": ("linen", ("params", "params"), True), "t_none_int": ("nnx", (), True),
           "t_fold_half": ("tunix", ("base",), True), "t_none_half": ("linen", ("params", "params"), False)}


def probe_seqs(cx):
    from converters import probe

    return probe.probe_tokens(cx["wtok"], cx["probe"], cf.TINY["vocab"])[0]


@pytest.mark.parametrize("name", list(TRUE_CONVENTIONS))
def test_layouts_match_the_maxtext_forward(cx, name):
    """Each layout is found from _METADATA alone and converts to logits equal to MaxText's forward."""
    from converters import reference
    from converters.orbax_reader import Checkpoint
    from converters.sizes import Dims

    qs, layout = TRUE_CONVENTIONS[name]
    ck = Checkpoint(cx["items"][name])
    assert (ck.layout, ck.root, ck.use_zarr3) == LAYOUTS[name]
    assert ck.scanned == cx["specs"][name]["scanned"] and not ck.tied
    out, s = convert(cx, name, query_scale=qs, rope_layout=layout, rope_scaling="none")
    assert not [k for k in s["opened"] if "opt_state" in k or "teacher_params" in k or "rngs" in k]
    truth = truth_of(cx, name)
    seq = probe_seqs(cx)[0]
    ref = reference.forward(cf.truth_as_reference(truth), seq, Dims(**s["dims"]), qs, "none", layout)
    assert rel(hf_logits(out, seq), ref) < 1e-4
    params, _ = reference.load_params(cx["items"][name])  # orbax's own restore agrees with the reader
    np.testing.assert_array_equal(params["embedding"], truth["embedding"])


def truth_of(cx, name):
    return cf.load_truth(os.path.join(cx["dir"], "ck"), name)


@pytest.mark.parametrize("normalize", ["true", "false"])
def test_tied_embeddings_match_the_maxtext_forward(cx, normalize):
    """logits_via_embedding: lm_head = bf16(embedding) (/ sqrt(E) when normalized), written untied."""
    import ml_dtypes
    from safetensors.numpy import load_file

    from converters import reference
    from converters.sizes import Dims

    out, s = convert(cx, "tied", normalize_embedding_logits=normalize, rope_scaling="llama3")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["tie_word_embeddings"] is False and cfg["max_position_embeddings"] == 131072
    t = truth_of(cx, "tied")
    w = load_file(os.path.join(out, "model-00001-of-00001.safetensors"))
    head = t["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    if normalize == "true":
        head = head / np.float32(np.sqrt(96))
    np.testing.assert_array_equal(w["lm_head.weight"], head)
    np.testing.assert_array_equal(w["model.embed_tokens.weight"], t["embedding"])
    d = Dims(**s["dims"])
    p = cf.truth_as_reference(t)
    assert p["logits"] is None
    got = hf_logits(out)
    assert rel(got, reference.forward(p, PROMPT, d, "fold", "llama3", "interleaved", normalize == "true")) < 1e-4
    assert rel(got, reference.forward(p, PROMPT, d, "fold", "llama3", "interleaved", normalize != "true")) > 1e-2
    rec = json.load(open(os.path.join(out, "kdgen_convert.json")))
    assert rec["tied_embeddings"] is True and rec["normalize"] == normalize


@pytest.mark.parametrize("name,first,hint", [
    ("qwen3", "params/params/decoder/layers/self_attention/key_norm/scale",
     r"key_norm without its partner: a Qwen3 layer has both query_norm and key_norm; refusing"),
    ("bias", "decoder/layers_0/self_attention/query/bias/value", r"biases \(Qwen2-style"),
])
def test_non_llama_leaves_are_refused(cx, tmp_path, name, first, hint):
    from converters import ConvertError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(ConvertError, match=f"leaf {first} is not consumed by the Llama mapping: {hint}"):
        convert(cx, name, out=str(out), overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


# --- conventions from the data: auto, and a verifier that a consistent mistake cannot fool ------


@pytest.mark.parametrize("name", list(TRUE_CONVENTIONS))
def test_auto_finds_the_convention_of_a_trained_model(cx, name):
    """A trained model written in each of MaxText's parameterisations: auto picks the one it was
    written with, and the output is byte for byte the explicit conversion's."""
    qs, layout = TRUE_CONVENTIONS[name]
    out, s = convert(cx, name, out=os.path.join(cx["dir"], "auto", name), query_scale="auto", rope_layout="auto",
                     probe_text=cx["probe"])
    assert s["conventions"] == {"query_scale": qs, "rope_layout": layout, "rope_scaling": "none"}, s["losses"]
    losses = sorted(s["losses"].values())
    assert len(losses) == 4 and losses[1] - losses[0] > 0.1, s["losses"]
    explicit, _ = convert(cx, name, query_scale=qs, rope_layout=layout, rope_scaling="none")
    for f in ("model-00001-of-00001.safetensors", "config.json"):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(explicit, f), "rb").read(), f
    rec = json.load(open(os.path.join(out, "kdgen_convert.json")))
    assert rec["auto"] == ["query_scale", "rope_layout"] and len(rec["probe"]["losses"]) == 4
    assert not [n for n in os.listdir(os.path.join(cx["dir"], "auto")) if "partial" in n]


def test_auto_query_scale_alone(cx):
    """Only the query scale auto (the layout given): q is staged raw, k is final; same bytes."""
    out, s = convert(cx, "t_none_half", out=os.path.join(cx["dir"], "auto", "qs-only"), query_scale="auto",
                     rope_layout="half", probe_text=cx["probe"])
    assert s["conventions"]["query_scale"] == "none" and len(s["losses"]) == 2
    explicit, _ = convert(cx, "t_none_half", query_scale="none", rope_layout="half")
    f = "model-00001-of-00001.safetensors"
    assert open(os.path.join(out, f), "rb").read() == open(os.path.join(explicit, f), "rb").read()


def test_auto_finds_normalize_embedding_logits_of_a_tied_model(cx):
    """logits_via_embedding: the probe also tells normalize_embedding_logits apart (x sqrt(E) sharper)."""
    from converters import reference
    from converters.sizes import Dims

    out, s = convert(cx, "t_tied", out=os.path.join(cx["dir"], "auto", "t_tied"), query_scale="auto",
                     rope_layout="auto", normalize_embedding_logits="auto", probe_text=cx["probe"])
    assert s["conventions"] == {"query_scale": "fold", "rope_layout": "interleaved", "rope_scaling": "none",
                                "normalize": "true"}, s["losses"]
    assert len(s["losses"]) == 8
    seq = probe_seqs(cx)[1]
    ref = reference.forward(cf.truth_as_reference(truth_of(cx, "t_tied")), seq, Dims(**s["dims"]), "fold", "none",
                            "interleaved", True)
    assert rel(hf_logits(out, seq), ref) < 1e-4


def test_auto_refuses_untrained_weights(cx, tmp_path):
    from converters import ConvertError

    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"no candidate predicts the probe text \(best loss [0-9.]+ nats/token >= "
                                           r"3\.119, uniform would be 4\.159\): untrained weights"):
        convert(cx, "random", out=str(out), query_scale="auto", rope_layout="auto", probe_text=cx["probe"])
    assert os.listdir(tmp_path) == []  # neither --out nor a staging dir


def test_auto_says_what_the_probe_cannot_tell(cx, tmp_path):
    """llama3 rope scaling only changes wavelengths beyond 2048 tokens: a short probe cannot see it."""
    from converters import ConvertError

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConvertError, match=r"no clear winner: .*the probe cannot tell --rope-scaling apart on this "
                                           r"checkpoint; pass --probe-text FILE with more text like the model's "
                                           r"training data .*, or pass --rope-scaling explicitly"):
        convert(cx, "t_fold_int", out=str(out), query_scale="fold", rope_layout="interleaved", rope_scaling="auto",
                probe_text=cx["probe"])
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == []


def test_probe_is_one_pass_and_agrees_with_transformers(cx):
    """The probe reads each layer tensor once for all candidates, and its loss for the chosen
    convention equals transformers' loss of the converted model."""
    import torch
    from transformers import AutoModelForCausalLM

    from converters import conventions, probe
    from converters.mapping import hf_tensors
    from converters.sizes import Dims
    from safetensors.numpy import load_file

    name = "t_fold_int"
    raw_dir, s = convert(cx, name, query_scale="none", rope_layout="half")  # q/k exactly as stored ("raw")
    w = load_file(os.path.join(raw_dir, "model-00001-of-00001.safetensors"))
    d = Dims(**s["dims"])
    reads = {}

    def get(n, rows):
        reads[n] = reads.get(n, 0) + 1
        return w[n] if rows is None else w[n][rows]

    raw = {n for n, _, _ in hf_tensors(d) if n.endswith(("q_proj.weight", "k_proj.weight"))}
    cands = conventions.candidates(False, query_scale="auto", rope_layout="auto", rope_scaling="none",
                                   normalize="true")
    seqs = probe_seqs(cx)
    got = probe.losses(get, raw, d, seqs, cands, tied=False)
    assert all(v == 1 for n, v in reads.items() if n.startswith("model.layers.")), reads
    assert len([n for n in reads if n.startswith("model.layers.")]) == 9 * d.layers
    right = conventions.Convention("fold", "interleaved", "none")
    assert min(got, key=got.get) == right
    auto, _ = convert(cx, name, out=os.path.join(cx["dir"], "auto", name), query_scale="auto",
                      rope_layout="auto", probe_text=cx["probe"], overwrite=True)
    m = AutoModelForCausalLM.from_pretrained(auto, dtype=torch.float32)
    with torch.no_grad():
        total = sum(torch.nn.functional.cross_entropy(m(torch.tensor([q])).logits[0, :-1], torch.tensor(q[1:]),
                                                      reduction="sum").item() for q in seqs)
    assert abs(total / sum(len(q) - 1 for q in seqs) - got[right]) < 1e-3


def test_verifier_fails_a_consistent_convention_mistake(cx, capsys):
    """A model converted with the wrong explicit --query-scale matches the reference forward run
    with the same wrong flag (that is all the old check compared), but its language check and the
    checkpoint's own losses of every convention fail it. The right conversion passes only with
    rope_scaling taken as stated: a 128-token probe cannot see llama3 rope scaling."""
    name = "t_fold_int"
    items = cx["items"][name]
    right, _ = convert(cx, name, query_scale="fold", rope_layout="interleaved")
    wrong, _ = convert(cx, name, query_scale="none", rope_layout="interleaved")
    rc, lines, text = verify_inproc(capsys, "--model-path", right, "--reference", items, "--probe-text", cx["probe"])
    assert rc == 3, text
    assert "INCONCLUSIVE conventions: the probe cannot tell --rope-scaling apart" in text
    assert text.split("--- stderr ---")[0].strip().splitlines()[-1].startswith("INCONCLUSIVE: conventions")
    rc, lines, text = verify_inproc(capsys, "--model-path", right, "--reference", items, "--probe-text", cx["probe"],
                                    "--accept", "rope_scaling")
    assert rc == 0, text
    assert [ln.split(":")[0] for ln in lines][-3:] == ["PASS language", "PASS reference", "PASS conventions"], text
    assert "taken as stated, NOT checked: rope_scaling=none (--accept)" in text
    rc, lines, text = verify_inproc(capsys, "--model-path", wrong, "--reference", items, "--probe-text", cx["probe"])
    assert rc == 1, text
    tags = {ln.split(":")[0].split(" ", 1)[1]: ln.split(" ", 1)[0] for ln in lines}
    assert (tags["language"], tags["reference"], tags["conventions"]) == ("FAIL", "PASS", "FAIL"), text
    assert "fold/interleaved/none is clearly better than the converted none/interleaved/none" in text
    assert "does not predict text: loss" in text


def _probe_file(cx, kind: str) -> str | None:
    """Probe texts for the tiny word-level model: in-domain (the training mix), and ones that cannot
    tell the conventions apart or that the model does not predict."""
    rng = np.random.default_rng(77)
    lo, V = len(cf.SPECIALS), cf.TINY["vocab"]
    if kind == "builtin":
        return None  # English: every word is <unk> for this tokenizer
    if kind == "in-domain":
        return cx["probe"]
    rows = []
    for _ in range(12):
        if kind == "copy":  # FACTS: a copy-only text cannot tell a folded query scale apart
            a = rng.integers(lo, V, 64)
            rows.append(np.concatenate([a, a]))
        elif kind == "topic":
            rows.append(rng.choice(rng.choice(np.arange(lo, V), 6, replace=False), 128))
        elif kind == "random":
            rows.append(rng.integers(lo, V, 128))
    if kind == "short":
        rows = [cf.task_rows(rng, 1)[0][:24]]
    path = os.path.join(cx["dir"], f"probe-{kind}.txt")
    with open(path, "w") as f:
        f.write("\n\n".join(" ".join(cf.word(int(t)) for t in r) for r in rows) + "\n")
    return path


PROBES = ["in-domain", "builtin", "copy", "topic", "random", "short"]
WRONG = {"query_scale": dict(query_scale="none", rope_layout="interleaved", rope_scaling="none"),
         "rope_layout": dict(query_scale="fold", rope_layout="half", rope_scaling="none"),
         "rope_scaling": dict(query_scale="fold", rope_layout="interleaved", rope_scaling="llama3")}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_verifier_never_passes_a_wrong_conversion(cx, capsys, wrong):
    """Each single wrong convention of a trained model (true: fold / interleaved / no rope scaling),
    with every probe: the verifier fails it or is inconclusive (exit 1 or 3), never passes it; with
    and without --reference."""
    out, _ = convert(cx, "t_fold_int", out=os.path.join(cx["dir"], "wrong", wrong), **WRONG[wrong])
    verdicts = {}
    for kind in PROBES:
        probe_args = [] if kind == "builtin" else ["--probe-text", _probe_file(cx, kind)]
        refs = [[], ["--reference", cx["items"]["t_fold_int"]]] if kind in ("in-domain", "builtin") else [[]]
        for ref in refs:
            rc, text = verify_stdout(capsys, "--model-path", out, *probe_args, *ref)
            line = next(ln for ln in text.splitlines() if ln.split(" ", 1)[-1].startswith("conventions:"))
            verdicts[(kind, bool(ref))] = (rc, line.split(" ", 1)[0])
            assert rc in (1, 3) and not line.startswith("PASS"), text
            assert "ALL CHECKS PASSED" not in text
    # The in-domain probe catches the wrong query scale and rotary layout outright.
    if wrong != "rope_scaling":
        assert verdicts[("in-domain", False)] == (1, "FAIL") == verdicts[("in-domain", True)], verdicts


@pytest.mark.parametrize("kind", ["builtin", "copy", "short"])
def test_auto_refuses_when_the_probe_cannot_tell(cx, tmp_path, kind):
    """`auto` on the trained model with a probe that cannot separate the conventions refuses (and
    says what to pass) instead of picking one; --out is left as it was."""
    from converters import ConvertError

    probe_text = _probe_file(cx, kind)
    with pytest.raises(ConvertError, match=r"auto: (no clear winner|no candidate predicts).*pass --probe-text FILE "
                                           r"with more text like the model's training data"):
        convert(cx, "t_fold_int", out=str(tmp_path / "out"), query_scale="auto", rope_layout="auto",
                probe_text=probe_text)
    assert os.listdir(tmp_path) == []


# --- config.json and the generation config say only what is true ----------------------------


def test_config_promises_nothing_untrue(cx):
    from converters.hf_dir import tokenizer_ids

    out = os.path.join(cx["dir"], "empty-out")
    os.makedirs(out, exist_ok=True)  # an existing empty --out is filled
    convert(cx, "t_fold_int", out=out, rope_scaling="none", overwrite=False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["max_position_embeddings"] == 8192 and "rope_scaling" not in cfg
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == [2]  # a base tokenizer: its eos_token only, though <|eot_id|> exists
    out, _ = convert(cx, "t_fold_int", rope_scaling="llama3", max_position_embeddings=4096)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["max_position_embeddings"] == 4096 and cfg["rope_scaling"]["rope_type"] == "llama3"
    bos, eos, _ = tokenizer_ids(cx["tok"], 512, False)  # an instruct tokenizer: what its chat template ends with
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(cx["tok"])
    assert eos == [t.convert_tokens_to_ids("<|eot_id|>")] and t.convert_tokens_to_ids("<|end_of_text|>") not in eos


def test_sizes_follow_maxtext():
    from converters.sizes import SIZES

    big = SIZES["llama3.1-405b"]
    assert (big.dims.emb, big.dims.layers, big.dims.heads, big.dims.kv_heads, big.dims.mlp) == (16384, 126, 128, 8, 53248)
    assert (big.rope_layout, big.rope_scaling) == ("interleaved", "llama3")
    l33 = SIZES["llama3.3-70b"]
    assert l33.dims == SIZES["llama3.1-70b"].dims and (l33.rope_layout, l33.rope_scaling) == ("half", "none")
    l32 = SIZES["llama3.2-1b"]
    assert (l32.dims.emb, l32.dims.layers, l32.dims.head_dim, l32.rope_layout, l32.rope_scaling) == (
        2048, 16, 64, "half", "none")
    assert SIZES["llama3.2-3b"].dims.heads == 24
    assert SIZES["llama3.1-1b"].rope_scaling is None  # the fork's names: pass --rope-scaling

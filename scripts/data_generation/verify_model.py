#!/usr/bin/env python
"""Check a HF model dir (a converted MaxText Llama or Qwen3 checkpoint) before it serves as a teacher.

    verify_model.py --model-path DIR [--probe-text FILE] [--reference CKPT [--query-scale fold|none]
                    [--rope-scaling llama3|none] [--rope-layout interleaved|half]] [--vllm] [--tolerance X]

One line per check: `PASS name: detail`, `FAIL name: detail`, `SKIP name: reason` or
`INCONCLUSIVE name: detail` (a check that ran and cannot decide), then a summary line. Exit
status 1 when a check failed, 3 when none failed but one was inconclusive, 0 when every check ran
and passed.

Checks: config (fields, head_dim, untied embeddings, rope settings), generation_config,
tokenizer (files, loads, vocab fits the embedding), index (every shard present, every tensor
where the index says, no strays, total_size), tensors (names, shapes and dtype against the
config), finite (no NaN/Inf), transformers (loads, forward on a fixed prompt), language (the
model's next-token loss on the probe text, with its own tokenizer, is below a threshold: a
model that does not predict text fails), reference (logits against converters.reference's
forward of the MaxText checkpoint with the conventions the model was converted with),
conventions (the losses of every convention on the probe text, from the MaxText checkpoint with
--reference, else from the converted weights: PASS only when the converted convention beats every
other clearly, FAIL when another beats it clearly, INCONCLUSIVE when the probe cannot tell them
apart, so a consistent mistake never passes), vllm (the real engine greedy-generates the same
tokens as transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings")
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
INCONCLUSIVE = "INCONCLUSIVE"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}  # model_type -> class
EXIT_FAILED, EXIT_INCONCLUSIVE = 1, 3


def fixed_prompt(vocab: int, n: int = 48) -> list[int]:
    """Deterministic token ids, independent of the tokenizer (no BOS)."""
    return [(i * 37 + 11) % vocab for i in range(n)]


class Report:
    def __init__(self):
        self.failed: list[str] = []
        self.inconclusive: list[str] = []

    def __call__(self, ok: bool | None | str, name: str, detail: str) -> bool:
        """ok: True PASS, False FAIL, None SKIP, INCONCLUSIVE (a check that ran and cannot decide)."""
        tag = INCONCLUSIVE if ok == INCONCLUSIVE else "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{tag} {name}: {detail}", flush=True)
        if ok is False:
            self.failed.append(name)
        if ok == INCONCLUSIVE:
            self.inconclusive.append(name)
        return ok is True


def check_config(path: str, r: Report) -> dict | None:
    p = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        r(False, "config", f"--model-path {path} is not a directory")
        return None
    if not os.path.exists(p):
        r(False, "config", f"--model-path {path} is not a HF model dir (no config.json)")
        return None
    try:
        cfg = json.load(open(p))
    except ValueError as e:
        r(False, "config", f"{p} is not JSON: {e}")
        return None
    missing = [k for k in REQUIRED if k not in cfg]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    arch = ARCHITECTURES.get(cfg.get("model_type"))
    if arch is None or arch not in cfg.get("architectures", []):
        problems.append(f"model_type {cfg.get('model_type')!r} / architectures {cfg.get('architectures')} "
                        "are not llama / LlamaForCausalLM or qwen3 / Qwen3ForCausalLM")
    if cfg.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings must be false (the converter always writes lm_head, untied)")
    rs = cfg.get("rope_scaling")
    if rs is not None and (rs.get("rope_type", rs.get("type")) != "llama3" or "factor" not in rs):
        problems.append(f"rope_scaling {rs} is not a llama3 scaling")
    if not missing and cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        problems.append("num_attention_heads is not a multiple of num_key_value_heads")
    if problems:
        r(False, "config", f"{p}: " + "; ".join(problems))
        return None
    r(True, "config", f"{cfg['model_type']} E={cfg['hidden_size']} L={cfg['num_hidden_layers']} H={cfg['num_attention_heads']} "
      f"K={cfg['num_key_value_heads']} D={cfg['head_dim']} M={cfg['intermediate_size']} V={cfg['vocab_size']} "
      f"rope_scaling={'llama3' if rs else 'none'}")
    return cfg


def check_generation_config(path: str, r: Report) -> None:
    p = os.path.join(path, "generation_config.json")
    if not os.path.exists(p):
        r(False, "generation_config", f"{p} is missing")
        return
    try:
        g = json.load(open(p))
    except ValueError as e:
        r(False, "generation_config", f"{p} is not JSON: {e}")
        return
    r(g.get("eos_token_id") is not None, "generation_config", f"eos_token_id={g.get('eos_token_id')}")


def check_tokenizer(path: str, cfg: dict, r: Report):
    from converters.writer import TOKENIZER_FILES

    have = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(path, n))]
    if not any(n in have for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        r(False, "tokenizer", f"{path} has no tokenizer.json, tokenizer.model or vocab.json")
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        r(False, "tokenizer", f"{path}: cannot load: {str(e).splitlines()[0]}")
        return None
    n = len(tok)
    ok = n <= cfg["vocab_size"]
    r(ok, "tokenizer", f"{n} tokens, vocab_size {cfg['vocab_size']}"
      + ("" if ok else " (tokens without an embedding row: wrong tokenizer)") + f"; files {have}")
    return tok if ok else None


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    from converters.mapping import hf_tensors

    return {n: s for n, s, _ in hf_tensors(model_dims(cfg))}


def check_files(path: str, cfg: dict, r: Report) -> bool:
    """index, tensors, finite. Reads one tensor at a time."""
    import struct

    ip = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(ip):
        index = json.load(open(ip))
        wmap = index.get("weight_map", {})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        index, wmap = None, None
    else:
        r(False, "index", f"{path} has neither model.safetensors.index.json nor model.safetensors")
        return False
    files = sorted(set(wmap.values())) if wmap is not None else ["model.safetensors"]
    headers, problems = {}, []
    for f in files:
        fp = os.path.join(path, f)
        if not os.path.exists(fp):
            problems.append(f"{f} missing")
            continue
        try:
            with open(fp, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h = json.loads(fh.read(n))
            size = os.path.getsize(fp)
            end = max([v["data_offsets"][1] for k, v in h.items() if k != "__metadata__"] or [0])
            if 8 + n + end != size:
                problems.append(f"{f} is {size} bytes, header says {8 + n + end} (truncated?)")
            headers[f] = {k: v for k, v in h.items() if k != "__metadata__"}
        except (ValueError, struct.error, OSError) as e:
            problems.append(f"{f} unreadable: {e}")
    found = {k: (f, v) for f, h in headers.items() for k, v in h.items()}
    if wmap is None:
        wmap = {k: f for k, (f, _) in found.items()}
    wrong = [k for k, f in wmap.items() if k not in found or found[k][0] != f]
    stray = [k for k in found if k not in wmap]
    if wrong:
        problems.append(f"{len(wrong)} indexed tensors not in their file, e.g. {wrong[:3]}")
    if stray:
        problems.append(f"{len(stray)} tensors not in the index, e.g. {stray[:3]}")
    if index is not None:
        total = sum(v["data_offsets"][1] - v["data_offsets"][0] for _, v in found.values())
        if index.get("metadata", {}).get("total_size") not in (None, total):
            problems.append(f"total_size {index['metadata']['total_size']} != {total}")
    r(not problems, "index", "; ".join(problems) if problems else f"{len(files)} shard(s), {len(found)} tensors")
    if problems:
        return False

    want = expected_tensors(cfg)
    missing = [k for k in want if k not in found]
    extra = [k for k in found if k not in want]
    bad = [f"{k} {found[k][1]['shape']} != {list(s)}" for k, s in want.items()
           if k in found and tuple(found[k][1]["shape"]) != tuple(s)]
    dtypes = sorted({v["dtype"] for _, v in found.values()})
    want_dt = ST_DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype"))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if extra:
        problems.append(f"unexpected {extra[:3]}")
    if bad:
        problems.append(f"wrong shapes: {bad[:3]}")
    if len(dtypes) != 1 or (want_dt and dtypes[0] != want_dt):
        problems.append(f"dtypes {dtypes}, config says {want_dt}")
    r(not problems, "tensors", "; ".join(problems) if problems else f"{len(want)} tensors, shapes match config, dtype {dtypes[0]}")
    if problems:
        return False

    import torch
    from safetensors import safe_open

    nonfinite = []
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                if not bool(torch.isfinite(t).all()):
                    nonfinite.append(k)
                del t
    r(not nonfinite, "finite", f"NaN/Inf in {nonfinite[:5]}" if nonfinite else "no NaN/Inf in any tensor")
    return not nonfinite


def hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def check_transformers(path: str, cfg: dict, r: Report):
    import torch

    try:
        m = hf_model(path)
        with torch.no_grad():
            logits = m(torch.tensor([fixed_prompt(cfg["vocab_size"])])).logits[0].double().numpy()
    except Exception as e:  # noqa: BLE001
        r(False, "transformers", f"load/forward failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None, None
    import numpy as np

    ok = bool(np.isfinite(logits).all())
    r(ok, "transformers", f"{type(m).__name__} loads; logits {list(logits.shape)} finite={ok}")
    return m, logits


def probe_seqs(path: str, cfg: dict, args, r: Report, name: str):
    from converters import ConvertError, probe

    try:
        return probe.probe_tokens(path, args.probe_text, cfg["vocab_size"])
    except ConvertError as e:
        r(False, name, str(e))
        return None, None


def token_nll(logits, seq):
    """Next-token cross-entropy (nats) at each predicted position of one sequence's logits [T, V]."""
    import numpy as np

    lg = np.asarray(logits, dtype=np.float64)[:-1]
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    return lse - lg[np.arange(len(seq) - 1), np.asarray(seq[1:])]


def seq_loss(logits, seq) -> float:
    """Summed next-token cross-entropy (nats) of one sequence's logits [T, V]."""
    return float(token_nll(logits, seq).sum())


def max_probe_loss(cfg: dict, args) -> tuple[float, str]:
    from converters import conventions

    if args.probe_max_loss is not None:
        return args.probe_max_loss, "--probe-max-loss"
    return (conventions.max_loss(cfg["vocab_size"]),
            f"{conventions.MAX_LOSS_FRACTION} x ln(vocab {cfg['vocab_size']}) = {conventions.MAX_LOSS_FRACTION} x "
            f"{math.log(cfg['vocab_size']):.2f}")


def check_language(path: str, m, cfg: dict, args, r: Report) -> float | None:
    """The HF model's own loss on the probe text: a model that does not predict text fails."""
    import torch

    seqs, what = probe_seqs(path, cfg, args, r, "language")
    if seqs is None:
        return None
    with torch.no_grad():
        total = sum(seq_loss(m(torch.tensor([s])).logits[0].double().numpy(), s) for s in seqs)
    loss = total / sum(len(s) - 1 for s in seqs)
    limit, why = max_probe_loss(cfg, args)
    ok = loss < limit
    r(ok, "language", f"{'' if ok else 'does not predict text: '}loss {loss:.3f} nats/token (perplexity "
      f"{math.exp(min(loss, 50)):.1f}) on {what}; threshold {limit:.3f} ({why})")
    return loss


def converted_with(path: str, args) -> dict:
    """The conventions to check against: flags, else the converter's record in kdgen_convert.json."""
    rec = {}
    p = os.path.join(path, "kdgen_convert.json")
    if os.path.exists(p):
        try:
            rec = json.load(open(p))
        except ValueError:
            rec = {}
    out = {}
    for k in ("query_scale", "rope_layout", "rope_scaling", "normalize"):
        flag = getattr(args, k if k != "normalize" else "normalize_embedding_logits")
        out[k] = str(flag).lower() if flag is not None else rec.get(k)
    out["normalize"] = out["normalize"] or "true"
    out["tied"] = bool(rec.get("tied_embeddings"))
    return out


def load_reference(ckpt: str, cfg: dict, r: Report):
    import dataclasses

    from converters import ConvertError, reference

    try:
        params, d = reference.load_params(ckpt)
    except ConvertError as e:
        r(False, "reference", f"--reference {ckpt}: {e}")
        return None, None
    d = dataclasses.replace(d, rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
                            experts_per_token=cfg.get("num_experts_per_tok", 0))
    if (d.vocab, d.emb, d.layers, d.head_dim) != (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
                                                  cfg["head_dim"]):
        r(False, "reference", f"--reference {ckpt} has dims {d}, config.json says otherwise")
        return None, None
    return params, d


def check_reference(params, d, conv: dict, cfg: dict, logits, args, r: Report) -> None:
    import numpy as np

    from converters import reference

    ref = reference.forward(params, fixed_prompt(cfg["vocab_size"]), d, conv["query_scale"], conv["rope_scaling"],
                            conv["rope_layout"], conv["normalize"] == "true")
    err = float(np.abs(logits - ref).max() / np.abs(ref).max())
    tol = args.tolerance
    if tol is None:
        tol = 1e-4 if (cfg.get("torch_dtype") or cfg.get("dtype")) == "float32" else 3e-2
    r(err <= tol, "reference", f"max |hf - maxtext| / max |maxtext| = {err:.2e} (tolerance {tol:.0e}; "
      + " ".join(f"{k}={v}" for k, v in conv.items() if k != "tied" and (k != "normalize" or params.get("logits") is None))
      + ")")


def model_dims(cfg: dict):
    from converters.sizes import Dims

    return Dims(vocab=cfg["vocab_size"], emb=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                mlp=cfg.get("moe_intermediate_size", cfg["intermediate_size"]), rms_norm_eps=cfg["rms_norm_eps"],
                rope_theta=cfg["rope_theta"], family=cfg.get("model_type") if cfg.get("model_type") in ARCHITECTURES
                else "llama", experts=cfg.get("num_experts", 0), experts_per_token=cfg.get("num_experts_per_tok", 0))


def model_token_losses(path: str, cfg: dict, conv, tied: bool, seqs, cands) -> dict:
    """Per-token probe losses of every candidate convention, from the converted model itself: its
    q/k (and a tied head) are taken back to MaxText's raw values with the convention it was
    converted with (mapping.unfinalize_rows), then converters.probe scores each candidate in one
    streaming pass, one tensor at a time (so this works for any model size)."""
    from safetensors import safe_open

    from converters import mapping, probe

    d = model_dims(cfg)
    ip = os.path.join(path, "model.safetensors.index.json")
    wmap = json.load(open(ip))["weight_map"] if os.path.exists(ip) else None
    kinds = dict(mapping.deferred(d.layers, tied, {"query_scale", "rope_layout", "normalize"}, d.family))
    files: dict = {}

    def get(name, rows):
        f = wmap[name] if wmap is not None else "model.safetensors"
        if f not in files:
            files[f] = safe_open(os.path.join(path, f), framework="pt")
        sl = files[f].get_slice(name)
        t = (sl[rows] if rows is not None else sl[:]).float().numpy()
        return mapping.unfinalize_rows(kinds[name], t, d, conv) if name in kinds else t

    return probe.token_losses(get, set(kinds), d, seqs, cands, tied)


def reference_token_losses(params, d, seqs, cands) -> dict:
    """Per-token probe losses of every candidate convention from converters.reference's forward."""
    import numpy as np

    from converters import reference

    return {c: np.concatenate([token_nll(reference.forward(params, s, d, c.query_scale, c.rope_scaling,
                                                           c.rope_layout, c.normalize == "true"), s) for s in seqs])
            for c in cands}


def check_conventions(path: str, conv: dict, cfg: dict, args, r: Report, params=None, d=None) -> None:
    """Every convention's loss on the probe text, beside the one the model was converted with (from
    the MaxText checkpoint with --reference, else from the converted model itself). PASS only when
    the converted convention beats every other one clearly (conventions.judge: by more than the
    margin and Z standard errors of the measured per-token differences); FAIL when another beats
    it clearly; INCONCLUSIVE (never PASS) when the probe cannot tell them apart."""
    from converters import conventions

    missing = [k for k in ("query_scale", "rope_layout", "rope_scaling") if conv[k] is None]
    if missing:
        r(INCONCLUSIVE, "conventions", "cannot tell how the model was converted (no kdgen_convert.json): pass "
          + ", ".join(f"--{k.replace('_', '-')}" for k in missing))
        return
    seqs, what = probe_seqs(path, cfg, args, r, "conventions")
    if seqs is None:
        return
    tied = params.get("logits") is None if params is not None else bool(conv.get("tied"))
    chosen = conventions.Convention(conv["query_scale"], conv["rope_layout"], conv["rope_scaling"],
                                    conv["normalize"] if tied else "true")
    accepted = sorted(set(args.accept or ()))  # options taken as stated: not candidates, not checked
    # Qwen3: MaxText never folds the query scale (q/k norms; see converters/mapping.py): not a candidate
    pinned = {"query_scale"} if cfg.get("model_type") in ("qwen3", "qwen3_moe") else set()
    cands = conventions.candidates(tied, **{o: getattr(chosen, o) if o in set(accepted) | pinned else "auto"
                                            for o in conventions.CHOICES})
    if params is not None:
        per_token = reference_token_losses(params, d, seqs, cands)
        source = "from the --reference checkpoint"
    else:
        per_token = model_token_losses(path, cfg, chosen, tied, seqs, cands)
        source = "from the converted weights"
    limit, _ = max_probe_loss(cfg, args)
    j = conventions.judge(per_token, cfg["vocab_size"], chosen, args.probe_margin, limit)
    short = lambda c: "/".join(c.as_dict(tied).values())  # noqa: E731
    table = ", ".join(f"{short(c)}{'*' if c == chosen else ''} {v:.3f}" for c, v in sorted(j.means.items(),
                                                                                        key=lambda kv: kv[1]))
    detail = f"losses {source} on {what} ({'/'.join(chosen.as_dict(tied))}; * = converted with): {table}"
    if accepted:
        detail += "; taken as stated, NOT checked: " + ", ".join(f"{o}={getattr(chosen, o)}" for o in accepted
                                                               if o != "normalize" or tied) + " (--accept)"
    advice = conventions.PROBE_ADVICE + ("" if params is not None else "; --reference CKPT also compares the "
                                         "logits with the MaxText checkpoint's own forward")
    if "--rope-scaling" in j.flags_apart():
        advice += ("; llama3 rope scaling only changes wavelengths beyond 2048 tokens, which short documents "
                   "barely see: documents longer than that, or --accept rope_scaling to take it as converted")
    if j.status == "no_fit":
        r(INCONCLUSIVE, "conventions", f"cannot judge: no convention predicts {what} (best {j.means[j.best]:.3f} "
          f">= {limit:.3f}); {advice}; {detail}")
    elif j.status == "wrong":
        c, g = j.rivals[0]
        r(False, "conventions", f"{short(c)} is clearly better than the converted {short(chosen)} (by {g.mean:.3f} "
          f"nats/token, needs > {g.threshold:.3f}): {detail}")
    elif j.status == "undecided":
        c, g = j.rivals[0]
        r(INCONCLUSIVE, "conventions", f"the probe cannot tell {' / '.join(j.flags_apart())} apart: the converted "
          f"{short(chosen)} beats {short(c)} by {g.mean:.3f} nats/token, a decision needs > {g.threshold:.3f} (the "
          f"margin {args.probe_margin} or {conventions.Z:g} standard errors); {advice}; {detail}")
    else:
        c, g = min(((c, conventions.gap(per_token[chosen], per_token[c], args.probe_margin))
                    for c in per_token if c != chosen), key=lambda cg: cg[1].mean)
        r(True, "conventions", f"the converted {short(chosen)} beats every other convention clearly (the closest, "
          f"{short(c)}, by {g.mean:.3f} > {g.threshold:.3f} nats/token): {detail}")


def hf_greedy(m, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch

    m.generation_config.eos_token_id = None  # like vLLM's ignore_eos
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def check_vllm(path: str, m, tok, cfg: dict, args, r: Report) -> None:
    texts = ["The quick brown fox", "Write a short answer to this question:", "river mountain city",
             "Because the model"]
    prompts = [tok.encode(t, add_special_tokens=False) if tok is not None else fixed_prompt(cfg["vocab_size"], 8)
               for t in texts]
    n = args.vllm_tokens
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run([sys.executable, "-m", "converters.vllm_check", path, json.dumps(prompts), str(n),
                            args.vllm_dtype], capture_output=True, text=True, env=env, timeout=args.vllm_timeout,
                           cwd=REPO)
    except subprocess.TimeoutExpired:
        r(False, "vllm", f"the vLLM engine did not finish within {args.vllm_timeout}s")
        return
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("VLLM_RESULT ")), None)
    if p.returncode or line is None:
        tail = [ln for ln in (p.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
        r(False, "vllm", f"vLLM could not load/generate (rc={p.returncode}): {tail[0][:300]}")
        return
    got = json.loads(line[len("VLLM_RESULT "):])["tokens"]
    want = hf_greedy(m, prompts, n)
    same = sum(a == b for a, b in zip(got, want))
    detail = (f"{same}/{len(prompts)} prompts: vLLM greedy == transformers greedy ({n} tokens each; "
              f"{len({t for g in got for t in g})} distinct tokens, prompt 0 -> {got[0]})")
    if same != len(prompts):
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        detail += f"; prompt {i}: vllm {got[i]} vs hf {want[i]}"
    r(same == len(prompts), "vllm", detail)


def main(argv=None) -> int:
    from converters import conventions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="HF model dir (local)")
    ap.add_argument("--reference", help="MaxText Orbax checkpoint: compare logits, and score every convention")
    ap.add_argument("--query-scale", choices=("fold", "none"),
                    help="with --reference: the convention to check (default: kdgen_convert.json's)")
    ap.add_argument("--rope-scaling", choices=("llama3", "none"), help="likewise")
    ap.add_argument("--rope-layout", choices=("interleaved", "half"), help="likewise")
    ap.add_argument("--normalize-embedding-logits", choices=("true", "false"), help="likewise (tied embeddings)")
    ap.add_argument("--tolerance", type=float, help="relative logits tolerance (default 1e-4 f32, 3e-2 bf16)")
    ap.add_argument("--probe-text", metavar="FILE", help="a text file for the language and conventions checks (blank lines separate "
                    "sequences); default: built-in English documents")
    ap.add_argument("--probe-max-loss", type=float,
                    help="language check threshold in nats/token (default 0.75 x ln(vocab_size))")
    ap.add_argument("--probe-margin", type=float, default=conventions.DEFAULT_MARGIN,
                    help="the least mean loss difference (nats/token) taken as a decision between two conventions "
                    "(a decision also needs %g standard errors of the measured differences)" % conventions.Z)
    ap.add_argument("--accept", action="append", choices=("query_scale", "rope_layout", "rope_scaling", "normalize"),
                    help="take this convention as the model dir states it instead of checking it (repeatable); the "
                    "conventions line says so. For an option the probe cannot see (usually rope_scaling)")
    ap.add_argument("--no-language-check", action="store_true",
                    help="skip the language check (random-weight test models)")
    ap.add_argument("--vllm", action="store_true", help="also load in vLLM and compare greedy tokens")
    ap.add_argument("--vllm-tokens", type=int, default=12)
    ap.add_argument("--vllm-dtype", default="float32")
    ap.add_argument("--vllm-timeout", type=float, default=300)
    args = ap.parse_args(argv)
    r = Report()
    path = args.model_path
    cfg = check_config(path, r)
    if cfg is not None:
        check_generation_config(path, r)
        tok = check_tokenizer(path, cfg, r)
        files_ok = check_files(path, cfg, r)
        m = logits = None
        if files_ok:
            m, logits = check_transformers(path, cfg, r)
        else:
            r(None, "transformers", "the weight files failed their checks")
        if m is not None and not args.no_language_check:
            check_language(path, m, cfg, args, r)
        elif args.no_language_check:
            r(None, "language", "--no-language-check")
        conv = converted_with(path, args)
        params = d = None
        if args.reference:
            missing = [k for k in ("query_scale", "rope_layout", "rope_scaling") if conv[k] is None]
            if missing:
                r(False, "reference", f"--reference needs --{missing[0].replace('_', '-')} (the model dir has no "
                  "kdgen_convert.json saying how it was converted)")
            elif logits is None:
                r(False, "reference", "no transformers logits to compare")
            else:
                params, d = load_reference(args.reference, cfg, r)
                if params is not None:
                    check_reference(params, d, conv, cfg, logits, args, r)
        if m is None:
            r(INCONCLUSIVE, "conventions", "not checked: the model does not load")
        elif not args.reference or params is not None:
            check_conventions(path, conv, cfg, args, r, params, d)
        if args.vllm:
            if m is not None:
                check_vllm(path, m, tok, cfg, args, r)
            else:
                r(False, "vllm", "skipped: the model does not load in transformers")
    if r.failed:
        print(f"FAILED: {', '.join(r.failed)}" + (f"; INCONCLUSIVE: {', '.join(r.inconclusive)}" if r.inconclusive
                                                    else ""), flush=True)
        return EXIT_FAILED
    if r.inconclusive:
        print(f"INCONCLUSIVE: {', '.join(r.inconclusive)} (no check failed, but these could not tell a right "
              "conversion from a wrong one)", flush=True)
        return EXIT_INCONCLUSIVE
    print("ALL CHECKS PASSED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The verifier's checks that run the model: transformers loads it, it predicts the probe text,
its logits match the MaxText checkpoint's numpy forward, its conventions beat every other one on
the probe, and vLLM greedy-generates what transformers does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from converters.verify_files import INCONCLUSIVE, Report, model_dims

# The dir holding the converters package: the vLLM subprocess imports it from there.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed_prompt(vocab: int, n: int = 48) -> list[int]:
    """Deterministic token ids, independent of the tokenizer (no BOS)."""
    return [(i * 37 + 11) % vocab for i in range(n)]


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
    r(*_verdict(j, per_token, short, args.probe_margin, what, advice, detail))


def _verdict(j, per_token: dict, short, margin: float, what: str, advice: str, detail: str
             ) -> tuple[bool | str, str, str]:
    """The conventions line for the judgement j of the converted convention: (ok, name, detail) for Report."""
    from converters import conventions

    chosen = j.chosen
    if j.status == "no_fit":
        return INCONCLUSIVE, "conventions", (f"cannot judge: no convention predicts {what} (best "
                                             f"{j.means[j.best]:.3f} >= {j.limit:.3f}); {advice}; {detail}")
    if j.status == "wrong":
        c, g = j.rivals[0]
        return False, "conventions", (f"{short(c)} is clearly better than the converted {short(chosen)} (by "
                                      f"{g.mean:.3f} nats/token, needs > {g.threshold:.3f}): {detail}")
    if j.status == "undecided":
        c, g = j.rivals[0]
        return INCONCLUSIVE, "conventions", (f"the probe cannot tell {' / '.join(j.flags_apart())} apart: the "
                                             f"converted {short(chosen)} beats {short(c)} by {g.mean:.3f} nats/token, "
                                             f"a decision needs > {g.threshold:.3f} (the margin {margin} or "
                                             f"{conventions.Z:g} standard errors); {advice}; {detail}")
    c, g = min(((c, conventions.gap(per_token[chosen], per_token[c], margin)) for c in per_token if c != chosen),
               key=lambda cg: cg[1].mean)
    return True, "conventions", (f"the converted {short(chosen)} beats every other convention clearly (the "
                                 f"closest, {short(c)}, by {g.mean:.3f} > {g.threshold:.3f} nats/token): {detail}")


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
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run([sys.executable, "-m", "converters.vllm_check", path, json.dumps(prompts), str(n),
                            args.vllm_dtype], capture_output=True, text=True, env=env, timeout=args.vllm_timeout,
                           cwd=PACKAGE_ROOT)
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

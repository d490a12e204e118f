"""The verifier's checks of a HF model dir's files: config, generation config, tokenizer, index,
tensors (names, shapes, dtype) and finite values, one tensor at a time. `Report` prints their lines."""

from __future__ import annotations

import json
import os

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings")
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
INCONCLUSIVE = "INCONCLUSIVE"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}  # model_type -> class


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
    ok, cfg = _load_json(p, r, "config", f"--model-path {path} is not a HF model dir (no config.json)")
    if not ok:
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
    ok, g = _load_json(p, r, "generation_config", f"{p} is missing")
    if ok:
        r(g.get("eos_token_id") is not None, "generation_config", f"eos_token_id={g.get('eos_token_id')}")


def _load_json(p: str, r: Report, name: str, missing: str) -> tuple[bool, object]:
    """(True, the JSON value in file p), or (False, None) after a FAIL line (`missing`: no such file)."""
    if not os.path.exists(p):
        r(False, name, missing)
        return False, None
    try:
        return True, json.load(open(p))
    except ValueError as e:
        r(False, name, f"{p} is not JSON: {e}")
        return False, None


def check_tokenizer(path: str, cfg: dict, r: Report):
    from converters.hf_dir import TOKENIZER_FILES

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


def model_dims(cfg: dict):
    from converters.sizes import Dims

    return Dims(vocab=cfg["vocab_size"], emb=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                mlp=cfg.get("moe_intermediate_size", cfg["intermediate_size"]), rms_norm_eps=cfg["rms_norm_eps"],
                rope_theta=cfg["rope_theta"], family=cfg.get("model_type") if cfg.get("model_type") in ARCHITECTURES
                else "llama", experts=cfg.get("num_experts", 0), experts_per_token=cfg.get("num_experts_per_tok", 0))


def expected_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    from converters.mapping import hf_tensors

    return {n: s for n, s, _ in hf_tensors(model_dims(cfg))}


def check_files(path: str, cfg: dict, r: Report) -> bool:
    """index, tensors, finite. Reads one tensor at a time."""
    indexed = check_index(path, r)
    return indexed is not None and check_tensors(indexed[1], cfg, r) and check_finite(path, indexed[0], r)


def check_index(path: str, r: Report) -> tuple[list[str], dict] | None:
    """Every shard present and whole, every tensor where the index says, no strays, total_size:
    (the shard files, {tensor: (file, header entry)}), or None after a FAIL."""
    import struct

    ip = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(ip):
        index = json.load(open(ip))
        wmap = index.get("weight_map", {})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        index, wmap = None, None
    else:
        r(False, "index", f"{path} has neither model.safetensors.index.json nor model.safetensors")
        return None
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
    return None if problems else (files, found)


def check_tensors(found: dict, cfg: dict, r: Report) -> bool:
    """Names, shapes and one dtype, against the config."""
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
    return not problems


def check_finite(path: str, files: list[str], r: Report) -> bool:
    """No NaN/Inf, one tensor at a time."""
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

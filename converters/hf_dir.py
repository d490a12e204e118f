"""The HF model dir's other files: config.json, the tokenizer (copied in; its bos and eos ids), uploads to gs://."""

from __future__ import annotations

import json
import os
import shutil

from converters import ConvertError, storage
from converters.sizes import Dims

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
# Llama 3's context before the llama3.1 scaling (LLaMARotaryEmbedding's old_context_len): the
# longest context a model without that scaling can claim; with it, llama3.1's 131072.
CONTEXT = {"none": 8192, "llama3": 131072}
QWEN3_CONTEXT = 40960  # the released Qwen3 dense configs' max_position_embeddings
# Tokens that end an assistant turn in common chat templates: eos ids when the template emits them.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


def config_json(d: Dims, dtype: str, rope_scaling: str, bos: int | None, eos: int | list | None,
                max_position_embeddings: int | None = None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": d.vocab,
        "hidden_size": d.emb,
        "intermediate_size": d.mlp,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings or CONTEXT[rope_scaling]),
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
    }
    if rope_scaling == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    if d.family != "llama":  # Qwen3ForCausalLM: the Llama fields plus q/k norms (implied by the model type)
        for k in ("mlp_bias", "pretraining_tp"):
            cfg.pop(k)
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                   sliding_window=None, max_window_layers=d.layers,
                   max_position_embeddings=int(max_position_embeddings or QWEN3_CONTEXT))
    if d.family == "qwen3_moe":  # layers/moe.py get_topk: top-k of the router logits, softmax over those k
        # (norm_topk_prob then divides by a sum of 1): HF's norm_topk_prob true computes the same.
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=d.experts,
                   num_experts_per_tok=d.experts_per_token, moe_intermediate_size=d.mlp, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                   router_aux_loss_coef=0.001)
    return cfg


def copy_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files of SRC (local or gs://) into DST_DIR; returns the names copied."""
    fs, p = storage.filesystem(src)
    if not fs.isdir(p):
        raise ConvertError(f"--tokenizer {src}: not a directory")
    names = [n for n in TOKENIZER_FILES if fs.exists(f"{p.rstrip('/')}/{n}")]
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConvertError(f"--tokenizer {src} has no tokenizer.json, tokenizer.model or vocab.json")
    for n in names:
        fs.get_file(f"{p.rstrip('/')}/{n}", os.path.join(dst_dir, n))
    return names


def tokenizer_ids(tok_dir: str, vocab: int, allow_vocab_padding: bool, flag: str = "--tokenizer") -> tuple:
    """(bos, eos list, token count) of the tokenizer in tok_dir; one-line error if it does not fit
    `vocab` embedding rows. eos: the tokenizer's eos_token and the end-of-turn tokens its chat
    template emits (an instruct tokenizer); a base tokenizer (no chat template) keeps its eos_token
    alone."""
    tj = os.path.join(tok_dir, "tokenizer.json")
    tc = os.path.join(tok_dir, "tokenizer_config.json")
    try:
        tcfg = json.load(open(tc)) if os.path.exists(tc) else {}
        if os.path.exists(tj):
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(tj)
            n = t.get_vocab_size(with_added_tokens=True)
            tid = lambda v: t.token_to_id(v["content"] if isinstance(v, dict) else v) if v else None  # noqa: E731
            bos, eos0, has = tid(tcfg.get("bos_token")), tid(tcfg.get("eos_token")), t.token_to_id
        else:
            from transformers import AutoTokenizer

            t = AutoTokenizer.from_pretrained(tok_dir)
            n, bos, eos0 = len(t), t.bos_token_id, t.eos_token_id
            has = lambda s: t.convert_tokens_to_ids(s) if s in t.get_vocab() else None  # noqa: E731
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many kinds
        raise ConvertError(f"{flag}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    if n > vocab or (n != vocab and not allow_vocab_padding):
        raise ConvertError(f"{flag} has {n} tokens but the checkpoint's embedding has {vocab} rows "
                           f"(wrong tokenizer for this model{'' if n > vocab else '; pass --allow-vocab-padding if the extra rows are padding'})")
    eos = [eos0] if eos0 is not None else []
    template = tcfg.get("chat_template") or ""
    if isinstance(template, list):  # named templates
        template = " ".join(str(x.get("template", "")) for x in template)
    jinja = os.path.join(tok_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        template += open(jinja).read()
    for tok in END_OF_TURN:
        i = has(tok) if tok in template else None
        if i is not None and i not in eos:
            eos.append(i)
    return bos, eos, n


def upload_dir_file(local_dir: str, name: str, out: str, remove: bool = True) -> None:
    """Copy local_dir/name to the output URL out/name (gs://), then delete the local copy."""
    fs, p = storage.filesystem(storage.join(out, name))
    fs.put_file(os.path.join(local_dir, name), p)
    if remove:
        os.remove(os.path.join(local_dir, name))


def clear_local(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

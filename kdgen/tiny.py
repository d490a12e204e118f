"""A tiny Llama teacher and a small parquet corpus, made on the spot (no model hub is reachable).

A byte-level BPE tokenizer with Llama-3 special tokens and chat template, a LlamaForCausalLM with
head_dim 64 (the vLLM CPU attention kernels need it), and a deterministic parquet corpus: same
seed, same bytes. Tests use the random-weight model (`make_model`); the demo uses
`make_demo_model`, whose weights are set from the corpus' word bigram (`fit_bigram`) so that what
it writes reads as words.
"""

from __future__ import annotations

import json
import os
import random

WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are or not have "
    "model data teacher student token layer weight train learn loss value query key attention "
    "river mountain city forest ocean cloud stone light night morning winter summer garden "
    "quick brown fox jumps over lazy dog small large bright dark ancient modern simple clear "
    "write read compute measure build run test check store load save send answer question "
    "because however therefore while when where which who what how why many few every each"
).split()

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]

# The Llama 3.1 chat template, trimmed of tool calling.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(sentence(rng, rng.randint(4, 14)) for _ in range(n_sentences))


def make_tokenizer(out_dir: str, vocab_size: int = 512, seed: int = 0) -> str:
    """Train a byte-level BPE tokenizer and save it in HF format into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [paragraph(rng, 6) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def make_model(
    out_dir: str,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    fit_texts: list[str] | None = None,
) -> str:
    """A random-weight Llama with its tokenizer and generation config, saved as safetensors
    (with fit_texts: weights set by `fit_bigram` from them instead)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    make_tokenizer(out_dir, vocab_size=vocab_size, seed=seed)
    tok = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so that greedy outputs depend on the prompt (not one token forever).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    if fit_texts is not None:
        info = fit_bigram(model, tok, fit_texts)
        with open(os.path.join(out_dir, DEMO_MARKER), "w") as f:
            json.dump(info, f)
    _save_quietly(model, out_dir)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out_dir)
    return out_dir


def _save_quietly(model, out_dir: str) -> None:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards: 100%" is noise here
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# The demo tokenizer's vocabulary is large enough for BPE to merge every word of WORDS, in all
# three forms ("river", " river", " River"), into one token (the merges run out at 739 ids).
DEMO_VOCAB_SIZE = 768


def word_class(piece: str, word_index: dict[str, int]) -> int:
    """Context class of a decoded token: its word (case-insensitive), the full stop, or 'other'
    (start of text, special tokens, anything not in the corpus)."""
    w = piece.strip().lower()
    if w in word_index:
        return word_index[w]
    return len(word_index) if w == "." else len(word_index) + 1


def fit_bigram(model, tok, texts: list[str], floor: float = -30.0) -> dict:
    """Set `model`'s weights so that it is the word-bigram model of `texts`.

    With a tokenizer that holds every word as one token, a bigram over tokens is a bigram over
    words. Each token's embedding is the one-hot of its context class (its word, the full stop,
    or 'other'); attention and MLP outputs are zeroed, so the residual stream stays that one-hot;
    after the final RMSNorm it is sqrt(hidden) * one-hot, and lm_head[v, class] =
    log P(v | class) / sqrt(hidden) gives logits = log P(next token | previous token's class),
    counted in `texts` (each text's first token follows the 'other' class). Tokens never seen
    after a class get `floor`. Closed form, well under a second; no training."""
    import math
    import time

    import torch

    t0 = time.time()
    words = sorted({w.lower() for w in WORDS})
    index = {w: i for i, w in enumerate(words)}
    n_classes = len(words) + 2
    hidden = model.config.hidden_size
    if n_classes > hidden:
        raise ValueError(f"the demo corpus has {n_classes} word classes; hidden_size {hidden} must hold them")
    vocab = model.config.vocab_size
    classes = torch.tensor([word_class(tok.decode([t]), index) for t in range(vocab)])
    counts = torch.zeros(n_classes, vocab, dtype=torch.float64)
    other = n_classes - 1
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prev = other
        for t in ids:
            counts[prev, t] += 1
            prev = int(classes[t])
    seen = counts.sum(1, keepdim=True)
    logp = torch.where(counts > 0, (counts / seen.clamp(min=1)).log(), torch.full_like(counts, floor))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[torch.arange(vocab), classes] = 1.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[:, :n_classes] = (logp.T / math.sqrt(hidden)).to(head.dtype)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    return {"classes": n_classes, "tokens_counted": int(counts.sum()), "texts": len(texts),
            "fit_seconds": round(time.time() - t0, 2)}


def make_demo_model(out_dir: str, texts: list[str], seed: int = 0) -> dict:
    """The demo teacher: `make_model`'s architecture and a word-level tokenizer, with weights set
    from `texts` by `fit_bigram`. Returns what the fit counted and the time it all took."""
    import time

    t0 = time.time()
    make_model(out_dir, vocab_size=DEMO_VOCAB_SIZE, seed=seed, fit_texts=texts)
    with open(os.path.join(out_dir, DEMO_MARKER)) as f:
        info = json.load(f)
    return {**info, "seconds": round(time.time() - t0, 2)}


DEMO_MARKER = "kdgen_demo_fit.json"


def corpus_texts(data_dir: str, text_column: str = "text") -> list[str]:
    """Every text of the parquet shards in data_dir, in file order."""
    import pyarrow.parquet as pq

    texts = []
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".parquet"):
            texts += [t for t in pq.read_table(os.path.join(data_dir, name), columns=[text_column])
                      .column(text_column).to_pylist() if t]
    return texts


def make_corpus(
    out_dir: str,
    num_files: int = 3,
    rows_per_file: int = 100,
    seed: int = 0,
    text_column: str = "text",
    row_group_size: int = 32,
) -> list[str]:
    """Write num_files parquet shards with a text column (and an id) of varied lengths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for f in range(num_files):
        texts = [paragraph(rng, rng.randint(1, 8)) for _ in range(rows_per_file)]
        ids = [f"{f}-{i}" for i in range(rows_per_file)]
        table = pa.table({"id": ids, text_column: texts})
        path = os.path.join(out_dir, f"shard-{f:05d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


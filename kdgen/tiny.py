"""A tiny Llama teacher and a small parquet corpus, made on the spot.

No model hub is reachable from the machines that run the demo and the tests, so we make
everything here: a byte-level BPE tokenizer with Llama-3 special tokens and chat template,
a random-weight LlamaForCausalLM (head_dim 64: the vLLM CPU attention kernels need it), and
a deterministic multi-file parquet corpus. Same seed, same bytes.
"""

from __future__ import annotations

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
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> str:
    """A random-weight Llama with its tokenizer and generation config, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    make_tokenizer(out_dir, seed=seed)
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
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out_dir)
    return out_dir


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


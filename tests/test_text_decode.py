"""The completion decoder: a byte-level tokenizer's one-call decode gives the DecodeStream's text
(vLLM's fast detokenizer) on every input; other decoders step the stream."""

from __future__ import annotations

import random
from functools import partial

import pytest

from kdgen.engines.text_decode import stream_decoder, stream_text, whole_text

TEXTS = ["héllo wörld — ünïcödé ✓ 日本語のテキスト 🙂🙂 done", "plain ascii text here", "€€€ 𝄞 ok"]


def cases(tok, n: int, seed: int = 0):
    """(prompt ids, completion ids): random ids (high bytes: characters cut anywhere), prompts cut
    mid-character, special tokens, ids past the vocabulary and empty completions; prompts long
    enough that their last 8 tokens can start mid-character."""
    rng = random.Random(seed)
    vocab, specials = len(tok), tok.all_special_ids
    for _ in range(n):
        if rng.random() < 0.3:
            ids = tok.encode(rng.choice(TEXTS), add_special_tokens=False)
            cut = rng.randint(1, len(ids))
            tail = ids[cut:][:rng.randint(0, len(ids) - cut)]
            yield ids[:cut], tail + [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        else:
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 24))]
            yield prompt, [rng.randrange(vocab + 3) if rng.random() > 0.05 else rng.choice(specials)
                           for _ in range(rng.randint(0, 40))]


def test_one_decode_gives_the_streams_text_on_every_input(tokenizer):
    backend = tokenizer._tokenizer
    decode = stream_decoder(tokenizer)
    assert decode.func is whole_text  # the tiny Llama's tokenizer is byte-level, as Llama 3's
    seen_cut = 0
    for prompt, ids in cases(tokenizer, 4000):
        want = stream_text(backend, prompt, ids)
        assert decode(prompt, ids) == want, (prompt, ids)
        seen_cut += backend.decode(prompt + ids, skip_special_tokens=True).endswith("\ufffd")
    assert seen_cut > 100  # completions that end mid-character were among them


def test_an_incomplete_character_at_the_end_is_left_out(tokenizer):
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False)
    prompt = tokenizer.encode("say", add_special_tokens=False)
    decode = stream_decoder(tokenizer)
    assert decode(prompt, ids) == "ok 🙂"
    assert decode(prompt, ids[:-1]).rstrip() == "ok"  # the emoji's last byte missing: not shown
    assert decode(prompt, []) == ""


def test_other_decoders_step_the_stream(tokenizer):
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer._tokenizer.__class__.from_str(tokenizer._tokenizer.to_str())
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    decode = stream_decoder(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert decode.func is stream_text
    assert decode([5, 6], [7, 8, 9]) == partial(stream_text, backend)([5, 6], [7, 8, 9])


def test_no_fast_backend_no_decoder():
    assert stream_decoder(object()) is None


@pytest.mark.parametrize("kind", [list, tuple])
def test_sequences_of_any_kind(tokenizer, kind):
    import numpy as np

    prompt, ids = tokenizer.encode("a b", add_special_tokens=False), tokenizer.encode(" c d", add_special_tokens=False)
    decode = stream_decoder(tokenizer)
    assert decode(kind(prompt), kind(ids)) == decode(np.array(prompt), np.array(ids)) == " c d"

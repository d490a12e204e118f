"""Completion text as vLLM's fast detokenizer makes it, for requests sent with detokenize=False:
kdgen stores token ids, and decoding only the completion (not vLLM's k+1 logprob tokens of every
position) is much cheaper. Byte-level tokenizers (Llama 3, Qwen, GPT-2) decode a sample in one call;
others step a DecodeStream as vLLM does. Also the exporter's decoder (kdgen.export.rows)."""

from __future__ import annotations

from functools import partial

# tokenizers' message for a stream it cannot continue (vLLM's INVALID_PREFIX_ERR_MSG)
INVALID_PREFIX_ERR_MSG = "Invalid prefix encountered"
REPLACEMENT = "\ufffd"  # what a byte-level decode shows for an incomplete UTF-8 character


def stream_decoder(tok):
    """(prompt ids, completion ids) -> the completion text as vLLM's fast detokenizer makes it:
    tokenizers' DecodeStream primed with the prompt, special tokens skipped, an incomplete UTF-8
    character at the end left out. None if `tok` has no fast (tokenizers) backend."""
    import tokenizers

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return None
    if isinstance(backend.decoder, tokenizers.decoders.ByteLevel):
        return partial(whole_text, backend)
    return partial(stream_text, backend)


def stream_text(backend, prompt_ids, ids) -> str:
    """The text vLLM's fast detokenizer makes, a DecodeStream step per token (`backend`: a
    tokenizers.Tokenizer)."""
    import tokenizers

    stream = tokenizers.decoders.DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    parts = []
    for t in ids:
        try:
            piece = stream.step(backend, t)
        except (OverflowError, TypeError):
            piece = None
        except Exception as e:  # as vLLM: restart the stream on tokenizers' invalid-prefix error
            if not str(e).startswith(INVALID_PREFIX_ERR_MSG):
                raise
            stream = tokenizers.decoders.DecodeStream(skip_special_tokens=True)
            piece = stream.step(backend, t)
        if piece:
            parts.append(piece)
    return "".join(parts)


def whole_text(backend, prompt_ids, ids) -> str:
    """stream_text's result in one decode, for a byte-level decoder (a Python call per token cost
    ~2 us). Its decode is the tokens' bytes read as UTF-8: after a prompt that ends at a character
    boundary, the completion's bytes decode on their own, and the stream emits them up to the last
    token where they did not end in an incomplete character. A prompt cut mid-character restarts
    the stream, and an id the tokenizer refuses is skipped by it: both step the stream."""
    prompt_ids, ids = list(prompt_ids), list(ids)  # also arrays (the exporter reads parquet)
    try:
        if ends_mid_character(backend, prompt_ids):
            return stream_text(backend, prompt_ids, ids)
        end = len(ids)
        text = backend.decode(ids, skip_special_tokens=True)
        while text.endswith(REPLACEMENT) and end > 0:
            end -= 1
            text = backend.decode(ids[:end], skip_special_tokens=True)
    except (OverflowError, TypeError, ValueError):
        return stream_text(backend, prompt_ids, ids)
    return text


def ends_mid_character(backend, ids: list[int]) -> bool:
    """Whether a byte-level decode of ids ends in an incomplete (or invalid) character. UTF-8
    synchronizes itself: when the last 8 tokens' text ends in a whole character, so does the
    whole text (a prompt of thousands of tokens is not decoded for each sample)."""
    tail = backend.decode(ids[-8:], skip_special_tokens=True)
    if tail and not tail.endswith(REPLACEMENT):
        return False
    return backend.decode(ids, skip_special_tokens=True).endswith(REPLACEMENT)

"""Completion text as vLLM's fast detokenizer makes it, for requests sent with detokenize=False:
kdgen stores token ids, and decoding only the completion (not vLLM's k+1 logprob tokens of every
position) is much cheaper. Also the exporter's decoder (kdgen.export.rows)."""

from __future__ import annotations


# tokenizers' message for a stream it cannot continue (vLLM's INVALID_PREFIX_ERR_MSG)
INVALID_PREFIX_ERR_MSG = "Invalid prefix encountered"


def stream_decoder(tok):
    """(prompt ids, completion ids) -> the completion text as vLLM's fast detokenizer makes it:
    tokenizers' DecodeStream primed with the prompt, special tokens skipped, an incomplete UTF-8
    character at the end left out. None if `tok` has no fast (tokenizers) backend."""
    import tokenizers

    backend = getattr(tok, "_tokenizer", None)
    if backend is None:
        return None

    def decode(prompt_ids: list[int], ids: list[int]) -> str:
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

    return decode

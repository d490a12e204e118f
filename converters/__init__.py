"""MaxText Orbax -> HuggingFace Llama / Qwen3 / Qwen3 MoE converter and its checks (see converters/README.md).

Modules, one job each:
    sizes         MaxText's Llama sizes (with the RoPE each name gets) and dims inferred from shapes
    orbax_reader  find the model in an Orbax item dir (every MaxText layout), read block by block
    mapping       MaxText tensor -> HF tensor (transpose, RoPE de-interleave, query scale, tied head)
    conventions   the options a checkpoint does not record, candidates for `auto`, the choice rule
    probe         score candidates by next-token loss on a probe text, one pass over the layers
    writer        sharded safetensors written in place, index, config, tokenizer, upload
    convert       the conversion itself; cli is its fire front end (`kdgen-convert`)
    reference     an independent numpy forward of the MaxText parameterisation
"""


class ConvertError(Exception):
    """A problem the user can act on; the message is one line naming the file or flag."""

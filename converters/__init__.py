"""MaxText Orbax -> HuggingFace Llama converter and its checks (see converters/README.md).

Modules, one job each:
    sizes         model-size table (llama3.1-05b ... -70b) and dims inferred from shapes
    orbax_reader  find the params of an Orbax item dir (local or gs://), read block by block
    mapping       MaxText tensor -> HF tensor (transpose, RoPE de-interleave, query scale)
    writer        sharded safetensors written in place, index, config, tokenizer, upload
    convert       the conversion itself; cli is its fire front end (`kdgen-convert`)
    reference     an independent numpy forward of the MaxText parameterisation
"""


class ConvertError(Exception):
    """A problem the user can act on; the message is one line naming the file or flag."""

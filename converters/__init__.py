"""MaxText Orbax -> HuggingFace Llama / Qwen3 / Qwen3 MoE converter and its checks (see converters/README.md)."""

# Modules, one job each:
#     sizes            MaxText's Llama / Qwen3 sizes (with the RoPE each name gets) and dims inferred from shapes
#     orbax_tree       find the model in an Orbax item tree (every MaxText layout): root, layers, family
#     orbax_reader     the Checkpoint: orbax_tree's leaves read block by block with tensorstore
#     chunk_stream     decode a huge zarr3 chunk slab by slab (a zstd stream), never whole
#     mapping          MaxText tensor -> HF tensor (transpose, RoPE de-interleave, query scale, tied head)
#     conventions      the options a checkpoint does not record, candidates for `auto`, the choice rule
#     probe            score candidates by next-token loss on a probe text, one pass over the layers
#     dtypes           the output dtypes by name
#     safetensors_out  sharded safetensors written in place, and their index
#     file_writes      the shard files' pwrites: a background thread, O_DIRECT
#     hf_dir           the model dir's other files: config.json, tokenizer, uploads
#     storage          local paths and gs:// URLs (fsspec)
#     convert          the conversion itself
#     verify           the model verifier (checks in verify_files: the files; verify_forward: running the model)
#     vllm_check       the verifier's vLLM subprocess
#     cli              `kdgen-convert convert | verify | inspect | sizes` (argparse)
#     reference        an independent numpy forward of the MaxText parameterisation


class ConvertError(Exception):
    """A problem the user can act on; the message is one line naming the file or flag."""

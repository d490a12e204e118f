"""`kdgen-convert`: convert | inspect | sizes (fire). Errors print one line and exit 2.

    kdgen-convert convert --checkpoint gs://b/run/checkpoints/1000/items --out gs://b/hf/run-1000 \\
        --tokenizer /path/tok --query-scale fold|none|auto [--rope-layout interleaved|half|auto] \\
        [--rope-scaling llama3|none|auto] [--model-size llama3.1-8b] [--probe-text FILE] \\
        [--dtype bfloat16|float32] [--max-shard-size 5GB] [--block-mb 64] [--staging-dir DIR]
    kdgen-convert inspect --checkpoint PATH     # layout, leaves, inferred dims (reads no data)
"""

from __future__ import annotations

import json
import sys

from converters import ConvertError


def convert(checkpoint: str, out: str, query_scale: str = None, rope_scaling: str = None,
            tokenizer: str = None, model_size: str = None, dtype: str = "bfloat16",
            rope_layout: str = None, normalize_embedding_logits: str = None, probe_text: str = None,
            probe_margin: float = 0.02, probe_max_loss: float = None, max_shard_size: str = "5GB",
            block_mb: int = 64, staging_dir: str = None, overwrite: bool = False,
            allow_vocab_padding: bool = False, rope_theta: float = None, rms_norm_eps: float = None,
            max_position_embeddings: int = None, read_threads: int = 4, write_buffer_mb: int = 512,
            read_ahead: int = 2, direct_io: bool = True, experts_per_token: int = None):
    """Convert a MaxText Orbax checkpoint to a HF Llama model dir (local or gs://).

    --query-scale fold|none|auto is required; --rope-layout and --rope-scaling come from
    --model-size when it pins them, else they are required too. `auto` scores the candidates by
    the converted model's loss on a probe text. See converters/README.md.
    """
    from converters import writer
    from converters.convert import convert as run

    writer.tune_malloc()  # this process is ours: keep block buffers in the heap
    s = run(checkpoint, out, query_scale=query_scale, rope_scaling=rope_scaling, tokenizer=tokenizer,
            model_size=model_size, dtype=dtype, rope_layout=rope_layout,
            normalize_embedding_logits=normalize_embedding_logits, probe_text=probe_text,
            probe_margin=probe_margin, probe_max_loss=probe_max_loss, max_shard_size=max_shard_size,
            block_mb=block_mb, staging_dir=staging_dir, overwrite=overwrite,
            allow_vocab_padding=allow_vocab_padding, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
            max_position_embeddings=max_position_embeddings, read_threads=read_threads,
            write_buffer_mb=write_buffer_mb, read_ahead=read_ahead, direct_io=direct_io,
            experts_per_token=experts_per_token)
    s.pop("opened", None)
    print(json.dumps(s))


def inspect(checkpoint: str, model_size: str = None):
    """Print where the params are, their layout, leaf shapes and the dims they imply."""
    from converters import sizes
    from converters.convert import dims_of
    from converters.orbax_reader import GLOBAL_LEAVES, Checkpoint

    ck = Checkpoint(checkpoint)
    d = dims_of(ck, model_size)
    layer = ck.layer_ids()[0]
    leaves = {ck.leaf_path(n): [list(ck.shape(n)), str(ck.dtype(n))] for n in GLOBAL_LEAVES
              if not (n == "logits" and ck.tied)}
    leaves.update({ck.leaf_path(n, layer): [list(ck.shape(n, layer)), str(ck.dtype(n, layer))] for n in ck.layer_leaves})
    print(json.dumps({"items": ck.path, "layout": ck.layout, "root": "/".join(ck.root), "scanned": ck.scanned,
                      "tied_embeddings": ck.tied, "layers": ck.num_layers, "dims": d.__dict__,
                      "model_sizes": sizes.matching(d), "leaves": leaves}, indent=2))


def sizes_table():
    """The known model sizes, with the RoPE MaxText uses for each name."""
    from converters.sizes import SIZES

    for name, s in SIZES.items():
        print(name, s.dims, f"rope_layout={s.rope_layout} rope_scaling={s.rope_scaling or 'not pinned'}",
              f"({s.source})")


def main(argv=None):
    import fire

    try:
        fire.Fire({"convert": convert, "inspect": inspect, "sizes": sizes_table}, command=argv)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

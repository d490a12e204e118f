"""`kdgen-convert`: convert | inspect | sizes (fire). Errors print one line and exit 2.

    kdgen-convert convert --checkpoint gs://b/run/checkpoints/1000/items --out gs://b/hf/run-1000 \\
        --model-size llama3.1-1b --query-scale none --rope-scaling none --tokenizer /path/tok \\
        [--dtype bfloat16|float32] [--max-shard-size 5GB] [--block-mb 64] [--staging-dir DIR]
    kdgen-convert inspect --checkpoint PATH     # layout, leaves, inferred dims (reads no data)
"""

from __future__ import annotations

import json
import sys

from converters import ConvertError


def convert(checkpoint: str, out: str, query_scale: str = None, rope_scaling: str = None,
            tokenizer: str = None, model_size: str = None, dtype: str = "bfloat16",
            rope_layout: str = "interleaved", max_shard_size: str = "5GB", block_mb: int = 64,
            staging_dir: str = None, overwrite: bool = False, allow_vocab_padding: bool = False,
            rope_theta: float = None, rms_norm_eps: float = None, max_position_embeddings: int = None,
            read_threads: int = 4):
    """Convert a MaxText Orbax item dir to a HF Llama model dir (local or gs://).

    --query-scale fold|none and --rope-scaling llama3|none are required: see converters/README.md.
    """
    from converters.convert import convert as run

    s = run(checkpoint, out, query_scale=query_scale, rope_scaling=rope_scaling, tokenizer=tokenizer,
            model_size=model_size, dtype=dtype, rope_layout=rope_layout, max_shard_size=max_shard_size,
            block_mb=block_mb, staging_dir=staging_dir, overwrite=overwrite,
            allow_vocab_padding=allow_vocab_padding, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
            max_position_embeddings=max_position_embeddings, read_threads=read_threads)
    s.pop("opened", None)
    print(json.dumps(s))


def inspect(checkpoint: str, model_size: str = None):
    """Print where the params are, their layout, leaf shapes and the dims they imply."""
    from converters import sizes
    from converters.convert import dims_of
    from converters.orbax_reader import GLOBAL_LEAVES, LAYER_LEAVES, Checkpoint

    ck = Checkpoint(checkpoint)
    d = dims_of(ck, model_size)
    layer = ck.layer_ids()[0]
    leaves = {ck.leaf_path(n): [list(ck.shape(n)), str(ck.dtype(n))] for n in GLOBAL_LEAVES}
    leaves.update({ck.leaf_path(n, layer): [list(ck.shape(n, layer)), str(ck.dtype(n, layer))] for n in LAYER_LEAVES})
    match = [n for n, s in sizes.SIZES.items() if sizes._shape_key(s) == sizes._shape_key(d)]
    print(json.dumps({"items": ck.path, "root": "/".join(ck.root), "scanned": ck.scanned,
                      "layers": ck.num_layers, "dims": d.__dict__, "model_size": match[0] if match else None,
                      "leaves": leaves}, indent=2))


def sizes_table():
    """The known model sizes."""
    from converters.sizes import SIZES

    for name, d in SIZES.items():
        print(name, d)


def main(argv=None):
    import fire

    try:
        fire.Fire({"convert": convert, "inspect": inspect, "sizes": sizes_table}, command=argv)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

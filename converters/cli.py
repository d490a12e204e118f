"""`kdgen-convert` (argparse): convert | verify | inspect | sizes. Errors print one line and exit 2.

    kdgen-convert convert --checkpoint gs://b/run/checkpoints/1000/items --out gs://b/hf/run-1000 \\
        --tokenizer /path/tok --query-scale fold|none|auto [--rope-layout interleaved|half|auto] \\
        [--rope-scaling llama3|none|auto] [--model-size llama3.1-8b] [--probe-text FILE] \\
        [--dtype bfloat16|float32] [--max-shard-size 5GB] [--block-mb 64] [--staging-dir DIR]
    kdgen-convert verify --model-path DIR [--reference CKPT] [--probe-text FILE] [--vllm]   # exit 0|1|3
    kdgen-convert inspect --checkpoint PATH     # layout, leaves, inferred dims (reads no data)
    kdgen-convert sizes                         # the known model sizes
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import typing

from converters import ConvertError

# The `convert` flags are made from the signature of converters.convert.convert (names, types,
# defaults), so they cannot drift from it; CONVERT_HELP only adds the words. As in kdgen's own
# command line (kdgen/cli/), a flag is spelled with dashes or underscores (`--block-mb` or
# `--block_mb`), a boolean flag takes an optional value (`--overwrite`, `--direct-io False`), and
# no flag is abbreviated; the earlier python-fire CLI took those same spellings.
CONVERT_HELP = {
    "checkpoint": "MaxText Orbax item dir, or the step dir holding items/state/model_params (local or gs://)",
    "out": "the HF model dir to write (local or gs://); must be empty or absent unless --overwrite",
    "query_scale": "fold (MaxText folds 1/sqrt(head_dim) into the query kernel) | none | auto; required for Llama",
    "rope_scaling": "llama3 | none | auto; default from --model-size where the size pins it",
    "tokenizer": "HF tokenizer dir to ship with the model (required)",
    "model_size": "a known MaxText size (kdgen-convert sizes), checked against every leaf's shape",
    "dtype": "output dtype",
    "rope_layout": "interleaved (MaxText names llama3.1*) | half (other names) | auto; default from --model-size",
    "normalize_embedding_logits": "tied embeddings only: true (base.yml) | false | auto",
    "probe_text": "text file scored by `auto` (blank lines separate documents); default: built-in English documents",
    "probe_margin": "the least mean loss difference (nats/token) `auto` takes as a decision",
    "probe_max_loss": "`auto` refuses when the best loss is above this (default 0.75 x ln(vocab))",
    "max_shard_size": "safetensors shard size (a layer is never split across shards)",
    "block_mb": "read granularity: stored chunks merged up to this size (never cut)",
    "staging_dir": "where a gs:// output is assembled before upload (default: the system temp dir)",
    "overwrite": "replace the files of a non-empty --out",
    "allow_vocab_padding": "accept an embedding with more rows than the tokenizer has tokens",
    "rope_theta": "override the RoPE theta the family implies",
    "rms_norm_eps": "override the RMSNorm epsilon the family implies",
    "max_position_embeddings": "override the value the rope scaling implies",
    "read_threads": "tensorstore's decode and file threads",
    "write_buffer_mb": "memory for assembling transposed tensors before one contiguous write",
    "read_ahead": "blocks decoded ahead of the one being transformed",
    "direct_io": "write a local --out with O_DIRECT when nothing reads it back (False: through the page cache)",
    "experts_per_token": "Qwen3 MoE: num_experts_per_tok of the MaxText config (or from --model-size)",
}
INTERNAL = ("quiet",)  # convert() parameters for library callers, not flags


def parse_bool(v: str) -> bool:
    """`--overwrite`, `--overwrite true`, `--direct-io=0`: 1/true/yes/on or 0/false/no/off."""
    t = str(v).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _value_type(hint) -> type:
    """str for `str | None` and `str | int`, int for `int | None`, ... (the first non-None member)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (str, int, float, bool) else str


def add_convert_flags(ap: argparse.ArgumentParser) -> None:
    """One flag per parameter of converters.convert.convert, with its default."""
    from converters.conventions import CHOICES
    from converters.convert import convert
    from converters.dtypes import DTYPES

    choices = {("normalize_embedding_logits" if o == "normalize" else o): (*v, "auto") for o, v in CHOICES.items()}
    choices["dtype"] = tuple(DTYPES)
    hints = typing.get_type_hints(convert)
    params = [p for p in inspect.signature(convert).parameters.values() if p.name not in INTERNAL]
    undocumented = {p.name for p in params} ^ set(CONVERT_HELP)
    if undocumented:  # a parameter added or removed without its flag's words
        raise RuntimeError(f"CONVERT_HELP and convert()'s parameters differ: {sorted(undocumented)}")
    for p in params:
        spellings = ["--" + p.name.replace("_", "-")] + (["--" + p.name] if "_" in p.name else [])
        kind = _value_type(hints.get(p.name, str))
        kw: dict = {"dest": p.name, "help": CONVERT_HELP[p.name]}
        if p.default is inspect.Parameter.empty:
            kw["required"] = True
        else:
            kw["default"] = p.default
            kw["help"] += "" if p.default is None else f" (default: {p.default})"
        if kind is bool:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif p.name in choices:
            kw.update(type=str.lower, choices=choices[p.name])
        else:
            kw["type"] = kind
        ap.add_argument(*spellings, **kw)


def convert(args: argparse.Namespace) -> int:
    """Convert a MaxText Orbax checkpoint to a HF model dir (local or gs://); prints a JSON summary."""
    from converters import safetensors_out
    from converters.convert import convert as run

    safetensors_out.tune_malloc()  # this process is ours: keep block buffers in the heap
    s = run(**vars(args))
    s.pop("opened", None)
    print(json.dumps(s))
    return 0


def inspect_checkpoint(args: argparse.Namespace) -> int:
    """Print where the params are, their layout, leaf shapes and the dims they imply."""
    from converters import sizes
    from converters.convert import dims_of
    from converters.orbax_reader import Checkpoint
    from converters.orbax_tree import GLOBAL_LEAVES

    ck = Checkpoint(args.checkpoint)
    d = dims_of(ck, args.model_size)
    layer = ck.layer_ids()[0]
    leaves = {ck.leaf_path(n): [list(ck.shape(n)), str(ck.dtype(n))] for n in GLOBAL_LEAVES
              if not (n == "logits" and ck.tied)}
    leaves.update({ck.leaf_path(n, layer): [list(ck.shape(n, layer)), str(ck.dtype(n, layer))]
                   for n in ck.layer_leaves})
    print(json.dumps({"items": ck.path, "layout": ck.layout, "root": "/".join(ck.root), "scanned": ck.scanned,
                      "tied_embeddings": ck.tied, "layers": ck.num_layers, "dims": d.__dict__,
                      "model_sizes": sizes.matching(d), "leaves": leaves}, indent=2))
    return 0


def sizes_table(args: argparse.Namespace) -> int:
    """Print the known model sizes, with the RoPE MaxText uses for each name."""
    from converters.sizes import SIZES

    for name, s in SIZES.items():
        print(name, s.dims, f"rope_layout={s.rope_layout} rope_scaling={s.rope_scaling or 'not pinned'}",
              f"({s.source})")
    return 0


def verify(args: argparse.Namespace) -> int:
    from converters.verify import run

    return run(args)


def parser() -> argparse.ArgumentParser:
    from converters import verify as verify_mod

    ap = argparse.ArgumentParser(prog="kdgen-convert", allow_abbrev=False,
                                 description="MaxText Orbax checkpoint -> HuggingFace model dir, and the checks it "
                                 "must pass (see converters/README.md)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{convert,verify,inspect,sizes}")
    c = sub.add_parser("convert", help=convert.__doc__, description=convert.__doc__, allow_abbrev=False)
    add_convert_flags(c)
    c.set_defaults(func=convert)
    v = sub.add_parser("verify", help="check a HF model dir (exit 0 passed, 1 failed, 3 inconclusive)",
                       description=verify_mod.SUMMARY, allow_abbrev=False)
    verify_mod.add_arguments(v)
    v.set_defaults(func=verify)
    i = sub.add_parser("inspect", help=inspect_checkpoint.__doc__, description=inspect_checkpoint.__doc__,
                       allow_abbrev=False)
    i.add_argument("--checkpoint", required=True, help="item or step dir (local or gs://)")
    i.add_argument("--model-size", "--model_size", dest="model_size", help="check the leaves against this known size")
    i.set_defaults(func=inspect_checkpoint)
    sub.add_parser("sizes", help=sizes_table.__doc__).set_defaults(func=sizes_table)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    command = args.__dict__.pop("func")
    args.__dict__.pop("command")
    try:
        code = command(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()

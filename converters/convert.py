"""MaxText Orbax checkpoint -> HF Llama model dir (local or gs://), one block in memory at a time."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

from converters import ConvertError, mapping, sizes, storage, writer
from converters.orbax_reader import GLOBAL_LEAVES, LAYER_LEAVES, Checkpoint

ROPE_SCALINGS = ("llama3", "none")


def log(msg: str) -> None:
    print(f"[kdgen-convert] {msg}", file=sys.stderr, flush=True)


def dims_of(ck: Checkpoint, model_size: str | None = None, **overrides) -> sizes.Dims:
    """Dims inferred from the checkpoint's shapes; checked against --model-size when given."""
    shapes = {n: ck.shape(n, ck.layer_ids()[0]) for n in ("query", "key", "wi_0")}
    shapes["embedding"] = ck.shape("embedding")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    found = sizes.infer(shapes, ck.num_layers, ck.scanned, **overrides)
    if model_size:
        named = sizes.named(model_size)
        sizes.check(named, found, f"--model-size {model_size}", ck.path)
        found = dataclasses.replace(named, **overrides)
    # Every leaf must have the shape the dims imply.
    for layer in ck.layer_ids():
        for leaf in LAYER_LEAVES:
            _check_shape(ck, leaf, layer, found)
    for leaf in GLOBAL_LEAVES:
        _check_shape(ck, leaf, None, found)
    return found


def _check_shape(ck: Checkpoint, leaf: str, layer, d: sizes.Dims) -> None:
    want = mapping.source_shape(leaf, d, ck.scanned)
    got = ck.shape(leaf, layer)
    if got != want:
        raise ConvertError(f"checkpoint leaf {ck.leaf_path(leaf, layer)} has shape {list(got)}, expected "
                           f"{list(want)} for {d.emb=} {d.layers=} {d.heads=} {d.kv_heads=} {d.head_dim=} "
                           f"{d.mlp=} {d.vocab=}".replace("d.", ""))


def tokenizer_ids(tok_dir: str, vocab: int, allow_vocab_padding: bool, flag: str = "--tokenizer") -> tuple:
    """(bos, eos list, token count) of the tokenizer in tok_dir; one-line error if it does not fit
    `vocab` embedding rows. Uses `tokenizers` on tokenizer.json (light), transformers otherwise."""
    tj = os.path.join(tok_dir, "tokenizer.json")
    try:
        if os.path.exists(tj):
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(tj)
            n = t.get_vocab_size(with_added_tokens=True)
            tc = os.path.join(tok_dir, "tokenizer_config.json")
            tcfg = json.load(open(tc)) if os.path.exists(tc) else {}
            tid = lambda v: t.token_to_id(v["content"] if isinstance(v, dict) else v) if v else None  # noqa: E731
            bos, eos0, has = tid(tcfg.get("bos_token")), tid(tcfg.get("eos_token")), t.token_to_id
        else:
            from transformers import AutoTokenizer

            t = AutoTokenizer.from_pretrained(tok_dir)
            n, bos, eos0 = len(t), t.bos_token_id, t.eos_token_id
            has = lambda s: t.convert_tokens_to_ids(s) if s in t.get_vocab() else None  # noqa: E731
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many kinds
        raise ConvertError(f"{flag}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None
    if n > vocab or (n != vocab and not allow_vocab_padding):
        raise ConvertError(f"{flag} has {n} tokens but the checkpoint's embedding has {vocab} rows "
                           f"(wrong tokenizer for this model{'' if n > vocab else '; pass --allow-vocab-padding if the extra rows are padding'})")
    eos = [eos0] if eos0 is not None else []
    for tok in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"):
        i = has(tok)
        if i is not None and i not in eos:
            eos.append(i)
    return bos, eos, n


def convert(checkpoint: str, out: str, query_scale: str | None = None, rope_scaling: str | None = None,
            tokenizer: str | None = None, model_size: str | None = None, dtype: str = "bfloat16",
            rope_layout: str = "interleaved", max_shard_size: str | int = "5GB", block_mb: int = 64,
            staging_dir: str | None = None, overwrite: bool = False, allow_vocab_padding: bool = False,
            rope_theta: float | None = None, rms_norm_eps: float | None = None,
            max_position_embeddings: int | None = None, read_threads: int = 4, quiet: bool = False) -> dict:
    """Convert; returns a summary (dims, bytes, seconds). Raises ConvertError with one clear line."""
    t0 = time.monotonic()
    say = (lambda m: None) if quiet else log
    if query_scale is None:
        raise ConvertError("--query-scale is required: fold|none (see converters/README.md)")
    if rope_scaling not in ROPE_SCALINGS:
        raise ConvertError(f"--rope-scaling is required: {'|'.join(ROPE_SCALINGS)} (got {rope_scaling!r})")
    if tokenizer is None:
        raise ConvertError("--tokenizer is required: the HF tokenizer dir to ship with the model")
    opt = mapping.Options(query_scale=query_scale, rope_layout=rope_layout)
    if dtype not in writer.DTYPES:
        raise ConvertError(f"--dtype must be one of {'|'.join(writer.DTYPES)} (got {dtype!r})")

    ck = Checkpoint(checkpoint, block_bytes=int(block_mb) << 20, read_threads=read_threads)
    d = dims_of(ck, model_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
                max_position_embeddings=max_position_embeddings)
    say(f"{ck.path}: {'scanned' if ck.scanned else 'unscanned'} params at {'/'.join(ck.root) or '.'}, "
        f"dtype {ck.dtype('embedding')}, {d}")

    remote = storage.is_remote(out)
    ofs, opath = storage.filesystem(out)
    if ofs.exists(opath) and ofs.ls(opath) and not overwrite:
        raise ConvertError(f"--out {out} exists and is not empty; pass --overwrite to replace its files")
    if remote:
        local = tempfile.mkdtemp(prefix="kdgen-convert-", dir=staging_dir)
    else:
        local = opath
        os.makedirs(local, exist_ok=True)
    try:
        copied = writer.copy_tokenizer(tokenizer, local)
        bos, eos, n_tok = tokenizer_ids(local, d.vocab, allow_vocab_padding, flag=f"--tokenizer {tokenizer}")

        def shard_done(fname: str) -> None:
            if remote:
                writer.upload_dir_file(local, fname, out)
            say(f"wrote {fname}")

        shards = writer.ShardedSafetensors(local, mapping.hf_tensors(d), dtype,
                                           writer.parse_size(max_shard_size), on_shard_done=shard_done)
        # Unscanned: layer by layer (shards complete, and upload, in order). Scanned: leaf by leaf,
        # each stacked leaf read once along its chunk grid and scattered into every layer.
        order = [("embedding", None)]
        if ck.scanned:
            order += [(leaf, None) for leaf in LAYER_LEAVES]
        else:
            order += [(leaf, i) for i in range(d.layers) for leaf in LAYER_LEAVES]
        order += [("final_norm", None), ("logits", None)]
        for leaf, layer in order:
            t = time.monotonic()
            for origin, block in ck.blocks(leaf, layer, mapping.whole_axes(leaf, ck.scanned and leaf in LAYER_LEAVES)):
                for name, index, piece in mapping.pieces(leaf, block, origin, layer, ck.scanned, d, opt):
                    shards.write(name, index, piece)
                del block
            if ck.scanned or layer in (None, d.layers - 1):
                say(f"{ck.leaf_path(leaf, layer)} {list(ck.shape(leaf, layer))} done in {time.monotonic() - t:.1f}s")
        index = shards.finish()

        cfg = writer.config_json(d, dtype, rope_scaling, bos, eos[0] if len(eos) == 1 else eos)
        _dump(local, "config.json", cfg)
        _dump(local, "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False,
                                                "_from_model_config": False})
        _dump(local, "kdgen_convert.json", {"checkpoint": ck.path, "model_size": model_size, "query_scale": query_scale,
                                            "rope_scaling": rope_scaling, "rope_layout": rope_layout, "dtype": dtype,
                                            "scanned": ck.scanned, "tokenizer": tokenizer})
        if remote:  # the index goes last: its presence marks a complete upload
            for name in copied + ["config.json", "generation_config.json", "kdgen_convert.json", writer.INDEX]:
                writer.upload_dir_file(local, name, out)
    finally:
        if remote:
            writer.clear_local(local)
    secs = time.monotonic() - t0
    summary = {"out": out, "dims": dataclasses.asdict(d), "scanned": ck.scanned, "files": len(shards.files),
               "bytes_read": ck.bytes_read, "bytes_written": index["metadata"]["total_size"], "seconds": secs,
               "tokenizer_tokens": n_tok, "opened": list(ck.opened)}
    say(f"done: {summary['bytes_read'] / 1e6:.1f} MB read, {summary['bytes_written'] / 1e6:.1f} MB written "
        f"in {secs:.1f}s -> {out}")
    return summary


def _dump(d: str, name: str, obj) -> None:
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

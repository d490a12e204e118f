"""MaxText Orbax checkpoint -> HF Llama model dir (local or gs://), one block in memory at a time.

The model is assembled in a staging dir (a sibling of a local --out, or --staging-dir for gs://)
and only moved or uploaded into --out once it is complete and, with `auto` conventions, once a
clear winner was found: a refusal leaves --out as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

from converters import ConvertError, conventions, hf_dir, mapping, probe, safetensors_out, sizes, storage
from converters.conventions import CHOICES, Convention
from converters.orbax_reader import GLOBAL_LEAVES, Checkpoint

# Tokens that end an assistant turn in common chat templates: eos ids when the template emits them.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")
SCRATCH = ".kdgen-raw"


def log(msg: str) -> None:
    print(f"[kdgen-convert] {msg}", file=sys.stderr, flush=True)


def dims_of(ck: Checkpoint, model_size: str | None = None, **overrides) -> sizes.Dims:
    """Dims inferred from the checkpoint's shapes; checked against --model-size when given."""
    shapes = {n: ck.shape(n, ck.layer_ids()[0]) for n in ("query", "key", "moe_wi_0" if ck.family == "qwen3_moe"
                                                         else "wi_0")}
    shapes["embedding"] = ck.shape("embedding")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    found = sizes.infer(shapes, ck.num_layers, ck.scanned, ck.family, **overrides)
    if model_size:
        named = sizes.named(model_size).dims
        sizes.check(named, found, f"--model-size {model_size}", ck.path)
        found = dataclasses.replace(named, **overrides)
    # Every leaf must have the shape the dims imply.
    for layer in ck.layer_ids():
        for leaf in ck.layer_leaves:
            _check_shape(ck, leaf, layer, found)
    for leaf in GLOBAL_LEAVES:
        if not (leaf == "logits" and ck.tied):
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
    `vocab` embedding rows. eos: the tokenizer's eos_token and the end-of-turn tokens its chat
    template emits (an instruct tokenizer); a base tokenizer (no chat template) keeps its eos_token
    alone."""
    tj = os.path.join(tok_dir, "tokenizer.json")
    tc = os.path.join(tok_dir, "tokenizer_config.json")
    try:
        tcfg = json.load(open(tc)) if os.path.exists(tc) else {}
        if os.path.exists(tj):
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(tj)
            n = t.get_vocab_size(with_added_tokens=True)
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
    template = tcfg.get("chat_template") or ""
    if isinstance(template, list):  # named templates
        template = " ".join(str(x.get("template", "")) for x in template)
    jinja = os.path.join(tok_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        template += open(jinja).read()
    for tok in END_OF_TURN:
        i = has(tok) if tok in template else None
        if i is not None and i not in eos:
            eos.append(i)
    return bos, eos, n


def _resolve(value, size_value, flag: str, hint: str) -> str:
    if value is not None:
        return str(value).lower()
    if size_value is not None:
        return size_value
    raise ConvertError(f"{flag} is required: {hint} (or auto; see converters/README.md)")


def convert(checkpoint: str, out: str, query_scale: str | None = None, rope_scaling: str | None = None,
            tokenizer: str | None = None, model_size: str | None = None, dtype: str = "bfloat16",
            rope_layout: str | None = None, normalize_embedding_logits=None, probe_text: str | None = None,
            probe_margin: float = conventions.DEFAULT_MARGIN, probe_max_loss: float | None = None,
            max_shard_size: str | int = "5GB", block_mb: int = 64, staging_dir: str | None = None,
            overwrite: bool = False, allow_vocab_padding: bool = False, rope_theta: float | None = None,
            rms_norm_eps: float | None = None, max_position_embeddings: int | None = None, read_threads: int = 4,
            write_buffer_mb: int = 512, read_ahead: int = 2, direct_io: bool = True, quiet: bool = False,
            experts_per_token: int | None = None) -> dict:
    """Convert; returns a summary (dims, bytes, seconds, conventions). Raises ConvertError with one clear line."""
    t0 = time.monotonic()
    say = (lambda m: None) if quiet else log
    if tokenizer is None:
        raise ConvertError("--tokenizer is required: the HF tokenizer dir to ship with the model")
    if dtype not in safetensors_out.DTYPES:
        raise ConvertError(f"--dtype must be one of {'|'.join(safetensors_out.DTYPES)} (got {dtype!r})")

    ck = Checkpoint(checkpoint, block_bytes=int(block_mb) << 20, read_threads=read_threads, prefetch=int(read_ahead))
    size = sizes.named(model_size) if model_size else None
    d = dims_of(ck, model_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps)
    if d.family == "qwen3_moe":  # top-k is a config value (num_experts_per_tok), not in the checkpoint
        k = experts_per_token or (size.dims.experts_per_token if size else 0)
        if not k or not 0 < int(k) <= d.experts:
            raise ConvertError(f"--experts-per-token is required for a Qwen3 MoE checkpoint ({d.experts} experts): "
                               "num_experts_per_tok of the MaxText config (8 for qwen3-30b-a3b / 235b-a22b), or "
                               "pass --model-size")
        d = dataclasses.replace(d, experts_per_token=int(k))
    qwen3 = d.family != "llama"
    if qwen3:
        # MaxText's Qwen3 path pins what the Llama one leaves open (see mapping's docstring): no
        # folded query scale; RotaryEmbedding (half-split, no llama3 scaling) for every name that
        # does not start with "llama3.1"; normalize_embedding_logits false in every qwen3 config.
        if query_scale is not None and str(query_scale).lower() not in ("none", "auto"):
            raise ConvertError(f"--query-scale {query_scale}: this is a Qwen3 checkpoint (q/k norms), whose query "
                               "scale MaxText never folds into the kernel (init_query_w: depth_scaling 1.0 with "
                               "use_qk_norm); leave --query-scale out or pass none")
        query_scale = "none"
        size = size or sizes.Size(d, "half", "none", "MaxText's rule for qwen3 names", normalize="false")
    if query_scale is None:
        raise ConvertError("--query-scale is required: fold|none|auto (see converters/README.md)")
    values = {
        "query_scale": str(query_scale).lower(),
        "rope_layout": _resolve(rope_layout, size and size.rope_layout, "--rope-layout",
                                "interleaved (MaxText names llama3.1*) | half (other names)"),
        "rope_scaling": _resolve(rope_scaling, size and size.rope_scaling, "--rope-scaling",
                                 "llama3 (rope_use_scale: true) | none"),
        "normalize": conventions.norm_bool(normalize_embedding_logits) or (size and size.normalize) or "true",
    }
    cands = conventions.candidates(ck.tied, **values)
    auto = {o for o in CHOICES if len({getattr(c, o) for c in cands}) > 1}
    say(f"{ck.path}: {ck.layout}, {'scanned' if ck.scanned else 'unscanned'} params at {'/'.join(ck.root) or '.'}"
        f"{' (tied embeddings: logits_via_embedding)' if ck.tied else ''}, dtype {ck.dtype('embedding')}, {d}")

    remote = storage.is_remote(out)
    ofs, opath = storage.filesystem(out)
    if ofs.exists(opath) and (not ofs.isdir(opath) or ofs.ls(opath)) and not overwrite:
        raise ConvertError(f"--out {out} exists and is not empty; pass --overwrite to replace its files")
    if remote:
        local = tempfile.mkdtemp(prefix="kdgen-convert-", dir=staging_dir)
    else:
        parent = os.path.dirname(opath.rstrip("/")) or "."
        os.makedirs(parent, exist_ok=True)  # the staging dir is a sibling of --out: a rename publishes it
        local = tempfile.mkdtemp(prefix=f".{os.path.basename(opath.rstrip('/'))}.kdgen-partial-", dir=parent)
    shards = scratch = None
    try:
        copied = hf_dir.copy_tokenizer(tokenizer, local)
        bos, eos, n_tok = tokenizer_ids(local, d.vocab, allow_vocab_padding, flag=f"--tokenizer {tokenizer}")
        tokens = what = None
        if len(cands) > 1:
            tokens, what = probe.probe_tokens(local, probe_text, d.vocab)
        deferred = dict(mapping.deferred(d.layers, ck.tied, auto, d.family))
        # tensors that no auto option touches are final at once; the others are written raw
        fixed = Convention(**{o: getattr(mapping.RAW if o in auto else cands[0], o) for o in CHOICES})
        opt = mapping.Options(conv=fixed, tied=ck.tied)
        raw = frozenset(deferred)

        def shard_done(fname: str) -> None:
            if remote and not auto:  # with auto, nothing is uploaded before the probe has decided
                hf_dir.upload_dir_file(local, fname, out)
            say(f"wrote {fname}")

        # O_DIRECT for a local --out that nothing reads back (no probe, no upload): the bytes go to the
        # disk without a page-cache copy (no CPU for it, no dirty pages left to flush at the end).
        shards = safetensors_out.ShardedSafetensors(local, mapping.hf_tensors(d), dtype, safetensors_out.parse_size(max_shard_size),
                                           on_shard_done=shard_done, buffer_bytes=int(write_buffer_mb) << 20,
                                           direct_io=bool(direct_io) and not remote and len(cands) == 1)
        if deferred:
            os.makedirs(os.path.join(local, SCRATCH))
            shapes = {n: s for n, s, _ in mapping.hf_tensors(d)}
            scratch = safetensors_out.ShardedSafetensors(os.path.join(local, SCRATCH),
                                                [(n, shapes[n], None) for n in deferred], "float32", 1 << 62,
                                                buffer_bytes=int(write_buffer_mb) << 19)
        # Unscanned: layer by layer (shards complete, and upload, in order). Scanned: leaf by leaf,
        # each stacked leaf read once along its chunk grid and scattered into every layer.
        # logits_dense goes first: its transposes keep the main thread busy while the first blocks
        # decode, and its 1/V-wide stripes are not the last thing left once decoding is done (the
        # whole lm_head waited for its last stripe, then went out alone). A scanned checkpoint ends
        # with the embedding: whole rows, written as they decode, nothing left to transpose.
        order = [] if ck.tied else [("logits", None)]
        if ck.scanned:
            order += [(leaf, None) for leaf in ck.layer_leaves] + [("final_norm", None), ("embedding", None)]
        else:
            order += [("embedding", None)] + [(leaf, i) for i in range(d.layers) for leaf in ck.layer_leaves]
            order += [("final_norm", None)]
        t = time.monotonic()
        leaves = [(leaf, layer, mapping.whole_axes(leaf, ck.scanned and leaf in ck.layer_leaves),
                   dtype if mapping.plain(leaf, ck.tied) else None, leaf in mapping.SLAB_LEAVES)
                  for leaf, layer in order]
        last = None
        for leaf, layer, origin, block in ck.iter_blocks(leaves):
            if (leaf, layer) != last and last is not None:
                _leaf_done(say, ck, *last, t, d)
            last = (leaf, layer)
            for name, index, piece, is_raw in mapping.pieces(leaf, block, origin, layer, ck.scanned, d, opt, raw):
                try:
                    (scratch if is_raw else shards).write(name, index, piece)
                except safetensors_out.NonFinite as e:
                    raise ConvertError(f"checkpoint leaf {ck.leaf_path(leaf, layer)} holds NaN or Inf (or a value "
                                       f"beyond --dtype {dtype}'s range) at {list(origin)}+{list(block.shape)}: {e}; "
                                       "a corrupt checkpoint or a diverged run; refusing to write the model"
                                       ) from None
            # drop the last piece too: a view keeps the whole block alive while the next one decodes
            block = piece = None
        _leaf_done(say, ck, *last, t, d)

        losses = None
        chosen = cands[0]
        if len(cands) > 1:
            if scratch is not None:
                scratch.finish()
            t = time.monotonic()
            say(f"probe: scoring {len(cands)} candidate conventions on {what}")
            get = lambda name, rows: (scratch if name in raw else shards).read(name, rows)  # noqa: E731
            per_token = probe.token_losses(get, set(raw), d, tokens, cands, ck.tied)
            losses = {c: float(v.mean()) for c, v in per_token.items()}
            for c, v in sorted(losses.items(), key=lambda kv: kv[1]):
                say(f"probe: loss {v:.4f} nats/token (perplexity {math.exp(min(v, 50)):.2f})  {c.label(ck.tied)}")
            chosen = conventions.choose(per_token, d.vocab, ck.tied, margin=probe_margin,
                                        max_loss_value=probe_max_loss)
            say(f"probe: chose {chosen.label(ck.tied)} in {time.monotonic() - t:.1f}s")
            if scratch is not None:
                _finalize(shards, scratch, deferred, d, chosen)
                shutil.rmtree(os.path.join(local, SCRATCH))
        index = shards.finish()

        cfg = hf_dir.config_json(d, dtype, chosen.rope_scaling, bos, eos[0] if len(eos) == 1 else eos,
                                 max_position_embeddings)
        _dump(local, "config.json", cfg)
        _dump(local, "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False,
                                                "_from_model_config": False})
        record = {"checkpoint": ck.path, "layout": ck.layout, "model_size": model_size, "dtype": dtype,
                  "scanned": ck.scanned, "tied_embeddings": ck.tied, "tokenizer": tokenizer,
                  **chosen.as_dict(ck.tied), "auto": sorted(auto)}
        if losses is not None:
            record["probe"] = {"text": what, "margin": probe_margin,
                               "losses": [{**c.as_dict(ck.tied), "loss": round(v, 5)} for c, v in losses.items()]}
        _dump(local, "kdgen_convert.json", record)
        names = copied + ["config.json", "generation_config.json", "kdgen_convert.json"]
        if remote:  # the index goes last: its presence marks a complete upload
            for name in (shards.files if auto else []) + names + [safetensors_out.INDEX]:
                hf_dir.upload_dir_file(local, name, out)
        else:
            _publish(local, opath, shards.files + names + [safetensors_out.INDEX], overwrite)
    except BaseException:
        for w in (shards, scratch):
            if w is not None:
                w.abort()
        raise
    finally:
        hf_dir.clear_local(local)
    secs = time.monotonic() - t0
    summary = {"out": out, "dims": dataclasses.asdict(d), "scanned": ck.scanned, "files": len(shards.files),
               "bytes_read": ck.bytes_read, "streamed_chunks": ck.streamed_chunks,
               "bytes_written": index["metadata"]["total_size"], "seconds": secs,
               "tokenizer_tokens": n_tok, "conventions": chosen.as_dict(ck.tied),
               "losses": None if losses is None else {c.label(ck.tied): v for c, v in losses.items()},
               "opened": list(ck.opened)}
    say(f"done: {summary['bytes_read'] / 1e6:.1f} MB read, {summary['bytes_written'] / 1e6:.1f} MB written "
        f"in {secs:.1f}s -> {out}")
    return summary


def _leaf_done(say, ck: Checkpoint, leaf: str, layer, t0: float, d: sizes.Dims) -> None:
    if ck.scanned or layer in (None, d.layers - 1):
        say(f"{ck.leaf_path(leaf, layer)} {list(ck.shape(leaf, layer))} read by {time.monotonic() - t0:.1f}s")


def _finalize(shards, scratch, deferred: dict, d: sizes.Dims, conv: Convention, band_bytes: int = 64 << 20) -> None:
    """Write the deferred tensors from their raw float32 copies with the chosen convention."""
    for name, kind in deferred.items():
        if kind == "norm":  # a Qwen3 q/k norm scale: one vector
            n = shards.where[name][2][0]
            shards.write(name, (slice(0, n),), mapping.finalize_rows(kind, scratch.read(name), d, conv))
            continue
        rows, cols = shards.where[name][2]
        unit = 1 if kind == "lm_head" else d.head_dim  # q/k: whole heads per band
        step = max(unit, band_bytes // (cols * 4) // unit * unit)
        for r in range(0, rows, step):
            sl = slice(r, min(rows, r + step))
            shards.write(name, (sl, slice(0, cols)), mapping.finalize_rows(kind, scratch.read(name, sl), d, conv))


def _publish(local: str, out: str, names: list[str], overwrite: bool) -> None:
    """Move the finished files into OUT (a rename when OUT is new or empty), the index last."""
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(local, out)
        os.makedirs(local)  # clear_local removes it again
        return
    os.makedirs(out, exist_ok=True)
    if overwrite:  # old shards or an old index that the new model does not have would mislead
        for n in os.listdir(out):
            if (n.endswith(".safetensors") or n == safetensors_out.INDEX) and n not in names:
                os.remove(os.path.join(out, n))
    for n in names:
        os.replace(os.path.join(local, n), os.path.join(out, n))


def _dump(d: str, name: str, obj) -> None:
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

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
from converters.dtypes import DTYPES
from converters.hf_dir import tokenizer_ids
from converters.orbax_reader import Checkpoint
from converters.orbax_tree import GLOBAL_LEAVES

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
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {'|'.join(DTYPES)} (got {dtype!r})")

    ck = Checkpoint(checkpoint, block_bytes=int(block_mb) << 20, read_threads=read_threads, prefetch=int(read_ahead))
    size = sizes.named(model_size) if model_size else None
    d = _dims(ck, model_size, size, rope_theta, rms_norm_eps, experts_per_token)
    cands = _candidates(d, ck.tied, size, query_scale, rope_layout, rope_scaling, normalize_embedding_logits)
    say(f"{ck.path}: {ck.layout}, {'scanned' if ck.scanned else 'unscanned'} params at {'/'.join(ck.root) or '.'}"
        f"{' (tied embeddings: logits_via_embedding)' if ck.tied else ''}, dtype {ck.dtype('embedding')}, {d}")
    remote, opath, local = _staging(out, staging_dir, overwrite)
    run = _Conversion(ck, d, cands, local, dtype, say)
    try:
        copied = hf_dir.copy_tokenizer(tokenizer, local)
        bos, eos, n_tok = tokenizer_ids(local, d.vocab, allow_vocab_padding, flag=f"--tokenizer {tokenizer}")
        tokens = what = None
        if len(cands) > 1:
            tokens, what = probe.probe_tokens(local, probe_text, d.vocab)
        run.open_writers(out if remote else None, max_shard_size, write_buffer_mb, direct_io)
        run.stream()
        chosen, losses = run.choose(tokens, what, probe_margin, probe_max_loss)
        index = run.shards.finish()
        cfg = hf_dir.config_json(d, dtype, chosen.rope_scaling, bos, eos[0] if len(eos) == 1 else eos,
                                 max_position_embeddings)
        record = _record(ck, chosen, run.auto, losses, what, probe_margin, model_size=model_size, dtype=dtype,
                         tokenizer=tokenizer)
        names = copied + _write_json_files(local, cfg, bos, eos, record)
        if remote:  # the index goes last: its presence marks a complete upload
            for name in (run.shards.files if run.auto else []) + names + [safetensors_out.INDEX]:
                hf_dir.upload_dir_file(local, name, out)
        else:
            _publish(local, opath, run.shards.files + names + [safetensors_out.INDEX], overwrite)
    except BaseException:
        run.abort()
        raise
    finally:
        hf_dir.clear_local(local)
    secs = time.monotonic() - t0
    summary = {"out": out, "dims": dataclasses.asdict(d), "scanned": ck.scanned, "files": len(run.shards.files),
               "bytes_read": ck.bytes_read, "streamed_chunks": ck.streamed_chunks,
               "bytes_written": index["metadata"]["total_size"], "seconds": secs,
               "tokenizer_tokens": n_tok, "conventions": chosen.as_dict(ck.tied),
               "losses": None if losses is None else {c.label(ck.tied): v for c, v in losses.items()},
               "opened": list(ck.opened)}
    say(f"done: {summary['bytes_read'] / 1e6:.1f} MB read, {summary['bytes_written'] / 1e6:.1f} MB written "
        f"in {secs:.1f}s -> {out}")
    return summary


def _dims(ck: Checkpoint, model_size: str | None, size: sizes.Size | None, rope_theta, rms_norm_eps,
          experts_per_token) -> sizes.Dims:
    """The checkpoint's dims, with a Qwen3 MoE's top-k (a config value, num_experts_per_tok, not in the
    checkpoint) from the flag or the named size."""
    d = dims_of(ck, model_size, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps)
    if d.family == "qwen3_moe":
        k = experts_per_token or (size.dims.experts_per_token if size else 0)
        if not k or not 0 < int(k) <= d.experts:
            raise ConvertError(f"--experts-per-token is required for a Qwen3 MoE checkpoint ({d.experts} experts): "
                               "num_experts_per_tok of the MaxText config (8 for qwen3-30b-a3b / 235b-a22b), or "
                               "pass --model-size")
        d = dataclasses.replace(d, experts_per_token=int(k))
    return d


def _candidates(d: sizes.Dims, tied: bool, size: sizes.Size | None, query_scale, rope_layout, rope_scaling,
                normalize_embedding_logits) -> list[Convention]:
    """The conventions the flags (and the named size, or MaxText's Qwen3 code) allow."""
    if d.family != "llama":
        # MaxText's Qwen3 path pins what the Llama one leaves open (see mapping.py): no folded query
        # scale; RotaryEmbedding (half-split, no llama3 scaling) for every name that does not start
        # with "llama3.1"; normalize_embedding_logits false in every qwen3 config.
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
    return conventions.candidates(tied, **values)


def _staging(out: str, staging_dir: str | None, overwrite: bool) -> tuple[bool, str, str]:
    """(remote, path of --out in its filesystem, a new local staging dir); refuses a non-empty --out."""
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
    return remote, opath, local


class _Conversion:
    """The tensors of one conversion: written into `shards` in the staging dir `local`, those that
    depend on an `auto` convention first raw into `scratch`, and finalized once the probe chose."""

    def __init__(self, ck: Checkpoint, d: sizes.Dims, cands: list[Convention], local: str, dtype: str, say):
        self.ck, self.d, self.cands, self.local, self.dtype, self.say = ck, d, cands, local, dtype, say
        self.auto = {o for o in CHOICES if len({getattr(c, o) for c in cands}) > 1}
        self.shards: safetensors_out.ShardedSafetensors | None = None
        self.scratch: safetensors_out.ShardedSafetensors | None = None
        self.deferred = dict(mapping.deferred(d.layers, ck.tied, self.auto, d.family))
        self.raw = frozenset(self.deferred)

    def open_writers(self, upload_to: str | None, max_shard_size, write_buffer_mb: int, direct_io: bool) -> None:
        """The shard files; with upload_to (a gs:// --out) each shard is uploaded once complete,
        unless an `auto` option still has to be decided."""
        def shard_done(fname: str) -> None:
            if upload_to and not self.auto:  # with auto, nothing is uploaded before the probe has decided
                hf_dir.upload_dir_file(self.local, fname, upload_to)
            self.say(f"wrote {fname}")

        # O_DIRECT for a local --out that nothing reads back (no probe, no upload): the bytes go to the
        # disk without a page-cache copy (no CPU for it, no dirty pages left to flush at the end).
        self.shards = safetensors_out.ShardedSafetensors(
            self.local, mapping.hf_tensors(self.d), self.dtype, safetensors_out.parse_size(max_shard_size),
            on_shard_done=shard_done, buffer_bytes=int(write_buffer_mb) << 20,
            direct_io=bool(direct_io) and not upload_to and len(self.cands) == 1)
        if self.deferred:
            os.makedirs(os.path.join(self.local, SCRATCH))
            shapes = {n: s for n, s, _ in mapping.hf_tensors(self.d)}
            self.scratch = safetensors_out.ShardedSafetensors(
                os.path.join(self.local, SCRATCH), [(n, shapes[n], None) for n in self.deferred], "float32", 1 << 62,
                buffer_bytes=int(write_buffer_mb) << 19)

    def order(self) -> list[tuple[str, int | None]]:
        """(leaf, layer) in reading order. Unscanned: layer by layer (shards complete, and upload, in
        order). Scanned: leaf by leaf, each stacked leaf read once along its chunk grid and scattered
        into every layer. logits_dense goes first: its transposes keep the main thread busy while the
        first blocks decode, and its 1/V-wide stripes are not the last thing left once decoding is done
        (the whole lm_head waited for its last stripe, then went out alone). A scanned checkpoint ends
        with the embedding: whole rows, written as they decode, nothing left to transpose."""
        ck = self.ck
        order = [] if ck.tied else [("logits", None)]
        if ck.scanned:
            order += [(leaf, None) for leaf in ck.layer_leaves] + [("final_norm", None), ("embedding", None)]
        else:
            order += [("embedding", None)] + [(leaf, i) for i in range(self.d.layers) for leaf in ck.layer_leaves]
            order += [("final_norm", None)]
        return order

    def stream(self) -> None:
        """Every leaf read block by block, each block's HF pieces written (the raw ones to scratch)."""
        ck, d, dtype = self.ck, self.d, self.dtype
        # tensors that no auto option touches are final at once; the others are written raw
        fixed = Convention(**{o: getattr(mapping.RAW if o in self.auto else self.cands[0], o) for o in CHOICES})
        opt = mapping.Options(conv=fixed, tied=ck.tied)
        t = time.monotonic()
        leaves = [(leaf, layer, mapping.whole_axes(leaf, ck.scanned and leaf in ck.layer_leaves),
                   dtype if mapping.plain(leaf, ck.tied) else None, leaf in mapping.SLAB_LEAVES)
                  for leaf, layer in self.order()]
        last = None
        for leaf, layer, origin, block in ck.iter_blocks(leaves):
            if (leaf, layer) != last and last is not None:
                _leaf_done(self.say, ck, *last, t, d)
            last = (leaf, layer)
            for name, index, piece, is_raw in mapping.pieces(leaf, block, origin, layer, ck.scanned, d, opt, self.raw):
                try:
                    (self.scratch if is_raw else self.shards).write(name, index, piece)
                except safetensors_out.NonFinite as e:
                    raise ConvertError(f"checkpoint leaf {ck.leaf_path(leaf, layer)} holds NaN or Inf (or a value "
                                       f"beyond --dtype {dtype}'s range) at {list(origin)}+{list(block.shape)}: {e}; "
                                       "a corrupt checkpoint or a diverged run; refusing to write the model"
                                       ) from None
            # drop the last piece too: a view keeps the whole block alive while the next one decodes
            block = piece = None
        _leaf_done(self.say, ck, *last, t, d)

    def choose(self, tokens, what: str | None, margin: float, max_loss: float | None
               ) -> tuple[Convention, dict | None]:
        """(the convention, {candidate: mean probe loss} or None): with several candidates the probe
        scores each and the deferred tensors are finalized with the clear winner."""
        if len(self.cands) == 1:
            return self.cands[0], None
        ck, say, shards, scratch = self.ck, self.say, self.shards, self.scratch
        if scratch is not None:
            scratch.finish()
        t = time.monotonic()
        say(f"probe: scoring {len(self.cands)} candidate conventions on {what}")
        get = lambda name, rows: (scratch if name in self.raw else shards).read(name, rows)  # noqa: E731
        per_token = probe.token_losses(get, set(self.raw), self.d, tokens, self.cands, ck.tied)
        losses = {c: float(v.mean()) for c, v in per_token.items()}
        for c, v in sorted(losses.items(), key=lambda kv: kv[1]):
            say(f"probe: loss {v:.4f} nats/token (perplexity {math.exp(min(v, 50)):.2f})  {c.label(ck.tied)}")
        chosen = conventions.choose(per_token, self.d.vocab, ck.tied, margin=margin, max_loss_value=max_loss)
        say(f"probe: chose {chosen.label(ck.tied)} in {time.monotonic() - t:.1f}s")
        if scratch is not None:
            _finalize(shards, scratch, self.deferred, self.d, chosen)
            shutil.rmtree(os.path.join(self.local, SCRATCH))
        return chosen, losses

    def abort(self) -> None:
        for w in (self.shards, self.scratch):
            if w is not None:
                w.abort()


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


def _record(ck: Checkpoint, chosen: Convention, auto: set[str], losses: dict | None, what: str | None,
            margin: float, model_size: str | None, dtype: str, tokenizer: str) -> dict:
    """kdgen_convert.json: the source, the flags that matter, the conventions and the probe's losses."""
    record = {"checkpoint": ck.path, "layout": ck.layout, "model_size": model_size, "dtype": dtype,
              "scanned": ck.scanned, "tied_embeddings": ck.tied, "tokenizer": tokenizer,
              **chosen.as_dict(ck.tied), "auto": sorted(auto)}
    if losses is not None:
        record["probe"] = {"text": what, "margin": margin,
                           "losses": [{**c.as_dict(ck.tied), "loss": round(v, 5)} for c, v in losses.items()]}
    return record


def _write_json_files(local: str, cfg: dict, bos, eos: list, record: dict) -> list[str]:
    """config.json, generation_config.json and the converter's record, kdgen_convert.json: their names."""
    _dump(local, "config.json", cfg)
    _dump(local, "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False,
                                            "_from_model_config": False})
    _dump(local, "kdgen_convert.json", record)
    return ["config.json", "generation_config.json", "kdgen_convert.json"]


def _dump(d: str, name: str, obj) -> None:
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")

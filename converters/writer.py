"""The HF model dir: sharded safetensors written in place, the index, config and tokenizer files.

Shard files are laid out up front (every shape is known before any data is read): header,
then a sparse file of the final size. Pieces are written straight to their place through a
short-lived memory map, so memory holds one block, not one tensor or one shard; a scanned
leaf's block fills a slice of many layers at once without ever holding a whole layer. Every
tensor's element count is tracked: a missed piece fails `finish`, it never reads as zeros.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from typing import Callable

import numpy as np

from converters import ConvertError, storage
from converters.sizes import Dims

# name -> (safetensors dtype, numpy dtype to cast to, numpy dtype stored in the file map)
DTYPES = {"float32": ("F32", "float32", "float32"), "bfloat16": ("BF16", "bfloat16", "uint16"),
          "float16": ("F16", "float16", "float16")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = str(s).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


class ShardedSafetensors:
    """Shards of a fixed tensor list; `write(name, index, float32 piece)` casts once and stores."""

    def __init__(self, out_dir: str, tensors: list[tuple[str, tuple[int, ...], int | None]], dtype: str,
                 max_shard_bytes: int, on_shard_done: Callable[[str], None] | None = None,
                 band_bytes: int = 32 << 20):
        if dtype not in DTYPES:
            raise ConvertError(f"--dtype must be one of {'|'.join(DTYPES)} (got {dtype!r})")
        self.out_dir = out_dir
        self.st_dtype, cast, stored = DTYPES[dtype]
        self.cast, self.stored = np_dtype(cast), np.dtype(stored)
        self.itemsize = self.stored.itemsize
        self.on_shard_done = on_shard_done
        groups = _groups(tensors)
        shards: list[list] = [[]]
        size = 0
        for g in groups:
            gbytes = sum(math.prod(s) for _, s, _ in g) * self.itemsize
            if shards[-1] and size + gbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].extend(g)
            size += gbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where: dict[str, tuple[str, int, tuple[int, ...]]] = {}  # name -> (file, data offset, shape)
        self.left: dict[str, int] = {}  # elements not yet written
        self.file_left: dict[str, int] = {}  # tensors not complete per file
        self.total_size = 0
        for fname, shard in zip(self.files, shards):
            header, off = {}, 0
            for name, shape, _ in shard:
                nbytes = math.prod(shape) * self.itemsize
                header[name] = {"dtype": self.st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            header["__metadata__"] = {"format": "pt"}
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            path = os.path.join(out_dir, fname)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(hb)))
                f.write(hb)
                f.truncate(8 + len(hb) + off)
                try:  # reserve the blocks now: a full disk is an error here, not a SIGBUS mid-write
                    os.posix_fallocate(f.fileno(), 0, 8 + len(hb) + off)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise ConvertError(f"no space left in {out_dir} for {fname} ({off / 1e9:.2f} GB); "
                                           "free space or pass --staging-dir / another --out") from None
                    # EOPNOTSUPP/EINVAL: the filesystem cannot reserve; the sparse file still works
            for name, shape, _ in shard:
                self.where[name] = (fname, 8 + len(hb) + header[name]["data_offsets"][0], tuple(shape))
                self.left[name] = math.prod(shape)
            self.file_left[fname] = len(shard)
            self.total_size += off
        self.bytes_written = 0
        self.band_bytes = band_bytes

    def write(self, name: str, index: tuple[slice, ...], piece: np.ndarray) -> None:
        fname, offset, shape = self.where[name]
        if piece.shape != tuple(sl.stop - sl.start for sl in index):
            raise AssertionError(f"{name}{index}: piece {piece.shape} does not fit")
        cast = lambda a: a.astype(self.cast, copy=False).view(self.stored)  # noqa: E731 - the one cast
        path = os.path.join(self.out_dir, fname)
        if len(shape) == 1:
            _store(path, self.stored, offset + index[0].start * self.itemsize, cast(piece))
        else:  # map one band of rows at a time: resident pages stay near band_bytes, however the
            # piece is strided (a transposed piece spans every row of its tensor)
            (r0, r1), cols = (index[0].start, index[0].stop), index[1]
            row_bytes = shape[1] * self.itemsize
            step = max(1, self.band_bytes // row_bytes)
            for r in range(r0, r1, step):
                n = min(step, r1 - r)
                mm = np.memmap(path, dtype=self.stored, mode="r+", offset=offset + r * row_bytes, shape=(n, shape[1]))
                mm[:, cols] = cast(piece[r - r0: r - r0 + n])
                del mm  # unmap: the written pages leave this process (the page cache writes them back)
        self.left[name] -= piece.size
        self.bytes_written += piece.size * self.itemsize
        if self.left[name] < 0:
            raise AssertionError(f"{name} written twice")
        if self.left[name] == 0:
            self.file_left[fname] -= 1
            if self.file_left[fname] == 0 and self.on_shard_done:
                self.on_shard_done(fname)

    def finish(self) -> dict:
        missing = [n for n, left in self.left.items() if left]
        if missing:
            raise AssertionError(f"tensors not fully written: {missing[:5]}")
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {n: w[0] for n, w in self.where.items()}}
        with open(os.path.join(self.out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        return index


def _store(path: str, dtype: np.dtype, offset: int, data: np.ndarray) -> None:
    mm = np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=data.shape)
    mm[...] = data
    del mm


def _groups(tensors):
    """Keep one layer (and the head: final norm + lm_head) in one shard."""
    groups: list[list] = []
    key = object()
    for t in tensors:
        k = t[2] if t[2] is not None else ("head" if t[0] != "model.embed_tokens.weight" else "embed")
        if not groups or k != key:
            groups.append([])
            key = k
        groups[-1].append(t)
    return groups


def config_json(d: Dims, dtype: str, rope_scaling: str, bos: int | None, eos: int | list | None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": d.vocab,
        "hidden_size": d.emb,
        "intermediate_size": d.mlp,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": d.max_position_embeddings,
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
    }
    if rope_scaling == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    return cfg


LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


def copy_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files of SRC (local or gs://) into DST_DIR; returns the names copied."""
    fs, p = storage.filesystem(src)
    if not fs.isdir(p):
        raise ConvertError(f"--tokenizer {src}: not a directory")
    names = [n for n in TOKENIZER_FILES if fs.exists(f"{p.rstrip('/')}/{n}")]
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConvertError(f"--tokenizer {src} has no tokenizer.json, tokenizer.model or vocab.json")
    for n in names:
        fs.get_file(f"{p.rstrip('/')}/{n}", os.path.join(dst_dir, n))
    return names


def upload_dir_file(local_dir: str, name: str, out: str, remove: bool = True) -> None:
    """Copy local_dir/name to the output URL out/name (gs://), then delete the local copy."""
    fs, p = storage.filesystem(storage.join(out, name))
    fs.put_file(os.path.join(local_dir, name), p)
    if remove:
        os.remove(os.path.join(local_dir, name))


def clear_local(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

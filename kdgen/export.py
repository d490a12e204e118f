"""`kdgen export OUT --to FORMAT --dest DIR`: a job's committed chunk objects -> trainer-ready shards.

  maxtext-offline  ArrayRecord files of tf.train.Example, what MaxText's offline distillation reads
                   (a `kdgen score --logprobs k` job: every token has the teacher's top-k)
  messages         role/content conversations, JSONL or parquet (MaxText SFT, TRL)
  parquet          the job's records compacted into large parquet shards (`datasets` reads the dir)

Only committed chunk objects are read (writer.read_chunk_object); failed rows are not exported. A
job with missing chunks is refused unless allow_partial. The shards are planned once, in
DEST/.kdgen_manifest.json (created once: source, format, and the chunk objects, i.e. row ranges,
of every shard); a rerun follows that plan and writes only the shards not there yet, each whole
in one create (local: temp file + link; gs: one upload), so reruns are idempotent and an
interrupted export resumes. The manifest is hidden (a dot file) so that readers of DEST/*.parquet
and `datasets.load_dataset(..., data_dir=DEST)` do not take it for data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kdgen import dataset, storage, writer

log = logging.getLogger(__name__)

TARGETS = ("maxtext-offline", "messages", "parquet")
MANIFEST = ".kdgen_manifest.json"
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class ExportError(ValueError):
    """The export cannot run as asked; the message says why and what to do."""


@dataclass
class Summary:
    shards: int = 0
    written: int = 0
    skipped: int = 0
    examples: int = 0

    def line(self, dest: str) -> str:
        return (f"export: {self.shards} shards in {dest} ({self.written} written, {self.skipped} already there), "
                f"{self.examples} examples written")


# ---------------------------------------------------------------- planning

def object_sizes(out: str) -> dict[str, int]:
    """{chunk object name: size in bytes} of OUT, from one listing."""
    fs, path = storage.filesystem(out)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True, **({"refresh": True} if storage.is_remote(out) else {}))
    except FileNotFoundError:
        return {}
    sizes = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and writer.parse_object_name(name):
            sizes[name] = int(e.get("size") or 0)
    return sizes


def check_target(fp: dict, to: str) -> None:
    task, k = fp.get("task", "generate"), fp.get("logprobs", 0)
    if to == "maxtext-offline" and (task != "score" or k <= 0):
        raise ExportError(
            "--to maxtext-offline needs the teacher's top-k at every token: export a `kdgen score --logprobs K` "
            f"job (this job is task {task!r} with logprobs {k}; a generation job has no top-k for its prompts)")
    if to == "messages" and task == "score":
        raise ExportError("--to messages needs generated completions; this is a scoring job (use --to parquet "
                          "or --to maxtext-offline)")
    if to == "messages" and fp.get("output_format") == "sequence_kd" and fp.get("messages_column"):
        raise ExportError("--to messages: sequence_kd records keep only the last user turn of a multi-turn "
                          "MESSAGES_COLUMN prompt; run the job with --output_format conversations to export them")


def plan_shards(names: list[str], sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Consecutive chunk objects (by name) grouped into shards of about shard_bytes of input."""
    shards, cur, acc = [], [], 0
    for n in sorted(names):
        if cur and acc + sizes.get(n, 0) > shard_bytes:
            shards.append(cur)
            cur, acc = [], 0
        cur.append(n)
        acc += sizes.get(n, 0)
    if cur:
        shards.append(cur)
    return shards


def shard_name(to: str, i: int, file_format: str) -> str:
    if to == "maxtext-offline":  # the names MaxText's save_top_k_teacher_logits.py gives its files
        return f"teacher_top_k_part_{i:05d}_host_000.array_record"
    return f"{'messages' if to == 'messages' else 'records'}-{i:05d}.{file_format}"


def chunk_entry(name: str, files: dict[str, str]) -> dict:
    base, _ = writer.parse_object_name(name)
    stem, start, end = dataset.parse_chunk_name(base)
    return {"object": name, "parquet_file": files.get(stem), "start": start, "end": end}


# ---------------------------------------------------------------- the command

def export(out: str, to: str, dest: str, shard_mb: float = 256.0, allow_partial: bool = False,
           file_format: str = "jsonl", dataset_path: str | None = None, workers: int = 4) -> Summary:
    from kdgen.status import job_plan, read_job

    if to not in TARGETS:
        raise ExportError(f"--to must be one of {TARGETS}, got {to!r}")
    if file_format not in writer.FILE_FORMATS:
        raise ExportError(f"--file_format must be one of {writer.FILE_FORMATS}, got {file_format!r}")
    if to == "parquet":
        file_format = "parquet"
    if shard_mb <= 0:
        raise ExportError(f"--shard_mb must be > 0, got {shard_mb}")
    job = read_job(out)
    fp = job["fingerprint"]
    check_target(fp, to)
    fmt = fp.get("output_file_format", "jsonl")
    plan = job_plan(out, dataset_path)  # the corpus pinned in _job.json, not the files found now
    sizes = object_sizes(out)
    planned = {f"{ch.name}.{fmt}": ch for ch in plan.chunks}
    present = [n for n in planned if n in sizes]
    missing = [ch for n, ch in planned.items() if n not in sizes]
    if missing:
        rows = sum(ch.num_rows for ch in missing)
        msg = (f"{out}: {len(missing)} of {len(planned)} chunks ({rows} of {plan.num_rows} rows) are not committed "
               f"yet, e.g. {missing[0].name}")
        if not allow_partial:
            raise ExportError(msg + "; finish the job (run it again) or pass --allow_partial to export what is there")
        log.warning("%s; exporting the %d committed chunks (--allow_partial)", msg, len(present))
    files = {f.stem: f.url for f in plan.files}
    manifest = {
        "source": out, "to": to, "file_format": file_format if to != "maxtext-offline" else "array_record",
        "job_fingerprint": fp, "missing_chunks": len(missing), "created_at": time.time(),
        "shards": [{"name": shard_name(to, i, file_format), "chunks": [chunk_entry(n, files) for n in group]}
                   for i, group in enumerate(plan_shards(present, sizes, int(shard_mb * 1e6)))],
    }
    manifest = ensure_manifest(dest, manifest)
    existing = set(storage.list_names(dest))
    summary = Summary(shards=len(manifest["shards"]))
    for shard in manifest["shards"]:
        if shard["name"] in existing:
            summary.skipped += 1
            continue
        data, n = build_shard(out, to, fp, shard, file_format, workers)
        if storage.create_if_absent(storage.join(dest, shard["name"]), data):
            summary.written += 1
            summary.examples += n
        else:
            summary.skipped += 1  # another exporter wrote it meanwhile (same plan, same bytes)
        log.info("shard %s: %d examples from %d chunk objects", shard["name"], n, len(shard["chunks"]))
    return summary


def ensure_manifest(dest: str, manifest: dict) -> dict:
    """Create DEST's manifest, or follow the one there if it plans the same export."""
    url = storage.join(dest, MANIFEST)
    if storage.create_if_absent(url, json.dumps(manifest, indent=1, sort_keys=True).encode()):
        return manifest
    try:
        old = storage.read_json(url)
        check_manifest_names(url, old)
    except ValueError as e:
        raise ExportError(f"{url} is unreadable ({str(e).removeprefix(url + ': ')}); export to a new --dest") from None
    same = (old.get("source") == manifest["source"] and old.get("to") == manifest["to"]
            and old.get("file_format") == manifest["file_format"]
            and [c["object"] for s in old["shards"] for c in s["chunks"]]
            == [c["object"] for s in manifest["shards"] for c in s["chunks"]])
    if not same:
        raise ExportError(f"{dest} holds an export of other chunks or settings (see {url}); export to a new --dest")
    return old


def check_manifest_names(url: str, manifest: dict) -> None:
    """Every shard and chunk object a manifest names is a plain name (no folder, no `..`, not
    absolute): a manifest must not make the export read or write outside OUT and DEST."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(x, dict) and isinstance(x.get("chunks"), list)
                                               for x in shards):
        raise ValueError(f"{url}: its shards are not a list of {{name, chunks}}")
    for shard in shards:
        storage.check_plain_name(shard.get("name"), url)
        for c in shard["chunks"]:
            storage.check_plain_name(c.get("object") if isinstance(c, dict) else c, url)


def read_in_order(urls: list[str], workers: int):
    """The chunk objects' (records, errors), in order, reading ahead `workers` objects at most
    (a shard's objects are never all in memory at once)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        window = [pool.submit(writer.read_chunk_object, u) for u in urls[:workers]]
        for i in range(len(urls)):
            part = window.pop(0).result()
            if i + workers < len(urls):
                window.append(pool.submit(writer.read_chunk_object, urls[i + workers]))
            yield part


def build_shard(out: str, to: str, fp: dict, shard: dict, file_format: str, workers: int) -> tuple[bytes, int]:
    """One shard's bytes, written chunk object by chunk object to a local temp file."""
    urls = [storage.join(out, c["object"]) for c in shard["chunks"]]
    parts = (records for records, _ in read_in_order(urls, workers))
    with tempfile.TemporaryDirectory(prefix="kdgen-export-") as d:
        path = os.path.join(d, shard["name"])
        if to == "maxtext-offline":
            n = write_maxtext(path, parts, fp["logprobs"])
        elif to == "messages":
            cols = ["messages", "id", "parquet_file", "row_idx", "sample_idx"]
            n = write_rows(path, ([messages_row(r, fp) for r in recs] for recs in parts), file_format, cols)
        else:
            n = write_rows(path, parts, "parquet", record_columns(fp))
        with open(path, "rb") as f:
            return f.read(), n


def write_rows(path: str, parts, file_format: str, cols: list[str]) -> int:
    """Rows of every part into one JSONL or parquet file (a row group per part; one schema)."""
    n = 0
    if file_format == "jsonl":
        with open(path, "wb") as f:
            for rows in parts:
                f.write(writer.encode_jsonl([{k: r[k] for k in cols if k in r} for r in rows]))
                n += len(rows)
        return n
    import pyarrow.parquet as pq

    from kdgen import columns

    pw = None
    try:
        for rows in parts:
            if not rows:
                continue
            table = columns.to_table(rows, cols + [columns.EXTRA])
            if pw is None:
                pw = pq.ParquetWriter(path, table.schema, **columns.writer_options(table.schema))
            pw.write_table(table)
            n += len(rows)
        if pw is None:  # no rows at all: an empty file of the same schema
            schema = columns.to_table([], cols + [columns.EXTRA]).schema
            pw = pq.ParquetWriter(path, schema, **columns.writer_options(schema))
    finally:
        if pw is not None:
            pw.close()
    return n


def record_columns(fp: dict) -> list[str]:
    """One column set for every shard of a job (the keys its records can have), so that a reader
    of the directory sees one schema."""
    lp = fp.get("logprobs", 0) > 0
    if fp.get("task", "generate") == "score":
        return (["parquet_file", "row_idx", "token_ids", "token_logprobs", "segment_starts"]
                + (["top_token_ids", "top_logprobs", "next_top_token_ids", "next_top_logprobs"] if lp else [])
                + ["completion_start", "completion_end", "completion_logprob", "metadata"])
    if fp.get("output_format") == "conversations":
        return ["id", "conversations", "metadata"] + (list(writer.LOGPROB_KEYS) if lp else [])
    return (["parquet_file", "row_idx", "prefix", "generated", "prompt_token_ids", "completion_token_ids",
             "finish_reason", "sample_idx"] + (list(writer.LOGPROB_KEYS) + ["sampling"] if lp else [])
            + ["reasoning", "metadata"])


# ---------------------------------------------------------------- messages

def messages_row(r: dict, fp: dict) -> dict:
    if "conversations" in r:
        meta = r.get("metadata") or {}
        msgs = [{"role": ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in r["conversations"]]
        return {"messages": msgs, "id": r.get("id"), "parquet_file": meta.get("parquet_file"),
                "row_idx": meta.get("idx"), "sample_idx": meta.get("sample_idx", 0)}
    msgs = []
    if fp.get("prompt_mode") == "chat" and fp.get("system_prompt"):
        msgs.append({"role": "system", "content": fp["system_prompt"]})
    msgs += [{"role": "user", "content": r["prefix"]}, {"role": "assistant", "content": r["generated"]}]
    return {"messages": msgs, "parquet_file": r["parquet_file"], "row_idx": r["row_idx"],
            "sample_idx": r.get("sample_idx", 0)}


# ---------------------------------------------------------------- maxtext-offline

def maxtext_examples(r: dict, k: int):
    """A scored row -> one tf.train.Example per segment, in the layout of MaxText's
    save_top_k_teacher_logits.py: `inputs` [L] and, per position t, the teacher's top-k of the
    distribution of the token after t: `top_k_logits` [L*k] (float32) and `top_k_indices` [L*k]
    (int64), plus `sequence_hash` and the fields that script saves by default (inputs_position,
    inputs_segmentation, targets, targets_segmentation) for an unpacked sequence."""
    from kdgen import tfexample

    ids = r["token_ids"]
    starts = r.get("segment_starts", [0])
    ends = starts[1:] + [len(ids)]
    for j, (s, e) in enumerate(zip(starts, ends)):
        tops_i = r["top_token_ids"][s + 1:e] + [r["next_top_token_ids"][j]]
        tops_v = r["top_logprobs"][s + 1:e] + [r["next_top_logprobs"][j]]
        bad = next((t for t, row in enumerate(tops_i) if len(row) != k), None)
        if bad is not None:
            raise ExportError(f"{r['parquet_file']} row {r['row_idx']}: position {s + bad} has "
                              f"{len(tops_i[bad])} top-k entries, not {k}")
        inputs = np.asarray(ids[s:e], dtype=np.int64)
        n = len(inputs)
        values = np.asarray(tops_v, dtype=np.float32)
        if np.isnan(values).any():  # a null logprob (float16 cannot hold it: never expected)
            raise ExportError(f"{r['parquet_file']} row {r['row_idx']}: a top-k logprob is missing")
        seg = np.ones(n, dtype=np.int64)
        yield tfexample.example({
            "inputs": inputs,
            "top_k_logits": values,
            "top_k_indices": np.asarray(tops_i, dtype=np.int64),
            "sequence_hash": [sequence_hash(inputs)],
            "inputs_position": np.arange(n, dtype=np.int64),
            "inputs_segmentation": seg,
            "targets": np.append(inputs[1:], 0),
            "targets_segmentation": np.append(seg[1:], 0),
        })


def sequence_hash(inputs: np.ndarray) -> int:
    """A stable int64 of the tokens (MaxText uses Python's hash(tokens.tobytes()), which is salted
    per process; nothing reads it back)."""
    return int.from_bytes(hashlib.blake2b(inputs.tobytes(), digest_size=8).digest(), "little", signed=True)


def write_maxtext(path: str, parts, k: int) -> int:
    from array_record.python import array_record_module

    w = array_record_module.ArrayRecordWriter(path, "group_size:1")  # as MaxText's writer
    n = 0
    try:
        for records in parts:
            for r in records:
                for ex in maxtext_examples(r, k):
                    w.write(ex)
                    n += 1
    finally:
        w.close()
    return n

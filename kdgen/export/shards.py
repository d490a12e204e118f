"""`kdgen export OUT --to FORMAT --dest DIR`: a job's committed chunk objects -> trainer-ready shards.

  maxtext-offline  ArrayRecord files of tf.train.Example, what MaxText's offline distillation reads
                   (every token needs the teacher's top-k: a `kdgen score --logprobs k` job, or a
                   generation job with LOGPROBS=k and PROMPT_LOGPROBS=true)
  messages         chat jobs: role/content `messages` plus TRL's conversational `prompt` /
                   `completion`, JSONL or parquet (MaxText SFT, TRL)
  text             prefix-mode (sequence KD) jobs: plain `text` plus `prompt` / `completion` strings
  distillkit       parquet of `input_ids`, `token_ids`, `top_values`: DistillKit's uncompressed
                   top-k rows (row j = the distribution of input_ids[j + 1]), from the same jobs
                   as maxtext-offline
  axolotl-kd       parquet of Axolotl's tokenized KD rows (`input_ids`, `labels`, `attention_mask`,
                   `target_token_ids`, `target_logprobs`, `target_mask`; row t = the distribution of
                   input_ids[t + 1]), what its KD collator and trainer take, from generation jobs
                   with LOGPROBS=k (conversations records: with PROMPT_LOGPROBS, for their token ids)
  parquet          the job's records compacted into large parquet shards (`datasets` reads the dir)

docs/outputs.md holds the schemas and the alignment of each. Only committed chunk objects are
read (writer.read_chunk_object); failed rows are not exported. A
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

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.records import writer
from kdgen.records.parquet_codec import EXPORT_TYPES

log = logging.getLogger(__name__)

TARGETS = ("maxtext-offline", "messages", "text", "distillkit", "axolotl-kd", "parquet")
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


def has_full_topk(fp: dict) -> bool:
    """Every token of the job's records has the teacher's top-k (scored texts, or prompt and
    completion of a PROMPT_LOGPROBS generation job)."""
    return fp.get("logprobs", 0) > 0 and (fp.get("task", "generate") == "score" or bool(fp.get("prompt_logprobs")))


def check_target(fp: dict, to: str) -> None:
    task, k = fp.get("task", "generate"), fp.get("logprobs", 0)
    if to in ("maxtext-offline", "distillkit") and not has_full_topk(fp):
        raise ExportError(
            f"--to {to} needs the teacher's top-k at every token: export a `kdgen score --logprobs K` job or a "
            f"generation job run with --logprobs K --prompt_logprobs (this job is task {task!r} with logprobs {k}"
            f"{'' if task == 'score' else ' and no prompt top-k'})")
    if to == "axolotl-kd" and (task == "score" or k <= 0):
        raise ExportError(f"--to axolotl-kd needs a generation job run with --logprobs K (this job is task {task!r} "
                          f"with logprobs {k}); scored texts: use --to distillkit or maxtext-offline")
    if to == "axolotl-kd" and fp.get("output_format") == "conversations" and not fp.get("prompt_logprobs"):
        raise ExportError("--to axolotl-kd needs token ids, which conversations records keep only with "
                          "--prompt_logprobs; run the job with --prompt_logprobs or --output_format sequence_kd")
    if to in ("messages", "text") and task == "score":
        raise ExportError(f"--to {to} needs generated completions; this is a scoring job (use --to parquet, "
                          f"distillkit or maxtext-offline)")
    chat = fp.get("prompt_mode", "prefix") == "chat" or fp.get("output_format") == "conversations"
    if to == "messages" and not chat:
        raise ExportError("--to messages: this prefix-mode job continues raw text, not a chat; export it with "
                          "--to text (plain `text`, `prompt`, `completion` strings)")
    if to == "text" and chat:
        raise ExportError("--to text: this is a chat job; export it with --to messages")
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
    return f"{to if to in ('messages', 'text', 'distillkit', 'axolotl-kd') else 'records'}-{i:05d}.{file_format}"


def chunk_entry(name: str, files: dict[str, str]) -> dict:
    base, _ = writer.parse_object_name(name)
    stem, start, end = dataset.parse_chunk_name(base)
    return {"object": name, "parquet_file": files.get(stem), "start": start, "end": end}


# ---------------------------------------------------------------- the command

def export(out: str, to: str, dest: str, shard_mb: float = 256.0, allow_partial: bool = False,
           file_format: str = "jsonl", dataset_path: str | None = None, workers: int = 4) -> Summary:
    from kdgen.views.status import job_plan, read_job

    if to not in TARGETS:
        raise ExportError(f"--to must be one of {TARGETS}, got {to!r}")
    if file_format not in writer.FILE_FORMATS:
        raise ExportError(f"--file_format must be one of {writer.FILE_FORMATS}, got {file_format!r}")
    if to in ("parquet", "distillkit", "axolotl-kd"):
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
        elif to == "distillkit":
            n = write_distillkit(path, parts, fp["logprobs"])
        elif to == "axolotl-kd":
            n = write_axolotl(path, parts, fp["logprobs"])
        elif to == "messages":
            cols = ["messages", "prompt", "completion", "id", "parquet_file", "row_idx", "sample_idx"]
            n = write_rows(path, ([messages_row(r, fp) for r in recs] for recs in parts), file_format, cols,
                           EXPORT_TYPES["chat"])
        elif to == "text":
            decode = completion_decoder(fp)
            cols = ["text", "prompt", "completion", "parquet_file", "row_idx", "sample_idx"]
            n = write_rows(path, ([text_row(r, decode) for r in recs] for recs in parts), file_format, cols,
                           EXPORT_TYPES["text"])
        else:
            n = write_rows(path, parts, "parquet", record_columns(fp))
        with open(path, "rb") as f:
            return f.read(), n


def write_rows(path: str, parts, file_format: str, cols: list[str], types: dict | None = None) -> int:
    """Rows of every part into one JSONL or parquet file (a row group per part; one schema;
    `types`: parquet_codec.EXPORT_TYPES of columns that are not record fields)."""
    n = 0
    if file_format == "jsonl":
        with open(path, "wb") as f:
            for rows in parts:
                f.write(writer.encode_jsonl([{k: r[k] for k in cols if k in r} for r in rows]))
                n += len(rows)
        return n
    import pyarrow.parquet as pq

    from kdgen.records import parquet_codec

    pw = None
    try:
        for rows in parts:
            if not rows:
                continue
            table = parquet_codec.to_table(rows, cols + [parquet_codec.EXTRA], types=types)
            if pw is None:
                pw = pq.ParquetWriter(path, table.schema, **parquet_codec.writer_options(table.schema))
            pw.write_table(table)
            n += len(rows)
        if pw is None:  # no rows at all: an empty file of the same schema
            schema = parquet_codec.to_table([], cols + [parquet_codec.EXTRA], types=types).schema
            pw = pq.ParquetWriter(path, schema, **parquet_codec.writer_options(schema))
    finally:
        if pw is not None:
            pw.close()
    return n


def record_columns(fp: dict) -> list[str]:
    """One column set for every shard of a job (the keys its records can have), so that a reader
    of the directory sees one schema."""
    lp = fp.get("logprobs", 0) > 0
    prompt_lp = list(writer.PROMPT_LOGPROB_KEYS) if lp and fp.get("prompt_logprobs") else []
    if fp.get("task", "generate") == "score":
        return (["parquet_file", "row_idx", "token_ids", "token_logprobs", "segment_starts"]
                + (["top_token_ids", "top_logprobs", "next_top_token_ids", "next_top_logprobs"] if lp else [])
                + ["completion_start", "completion_end", "completion_logprob", "metadata"])
    if fp.get("output_format") == "conversations":
        ids = ["prompt_token_ids", "completion_token_ids"] if prompt_lp else []  # inside metadata
        return ["id", "conversations", "metadata"] + (list(writer.LOGPROB_KEYS) + prompt_lp + ids if lp else [])
    return (["parquet_file", "row_idx", "prefix", "generated", "prompt_token_ids", "completion_token_ids",
             "finish_reason", "sample_idx"] + (list(writer.LOGPROB_KEYS) + prompt_lp + ["sampling"] if lp else [])
            + ["reasoning", "metadata"])


# ---------------------------------------------------------------- messages

def messages_row(r: dict, fp: dict) -> dict:
    """A chat job's record -> `messages` (role/content) and TRL's conversational prompt-completion
    form: `prompt` = every turn before the last, `completion` = [the last, assistant turn]."""
    if "conversations" in r:
        meta = r.get("metadata") or {}
        msgs = [{"role": ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in r["conversations"]]
        row = {"id": r.get("id"), "parquet_file": meta.get("parquet_file"), "row_idx": meta.get("idx"),
               "sample_idx": meta.get("sample_idx", 0)}
    else:
        msgs = []
        if fp.get("system_prompt"):
            msgs.append({"role": "system", "content": fp["system_prompt"]})
        msgs += [{"role": "user", "content": r["prefix"]}, {"role": "assistant", "content": r["generated"]}]
        row = {"parquet_file": r["parquet_file"], "row_idx": r["row_idx"], "sample_idx": r.get("sample_idx", 0)}
    return {"messages": msgs, "prompt": msgs[:-1], "completion": msgs[-1:], **row}


# ---------------------------------------------------------------- text (prefix mode)

def completion_decoder(fp: dict):
    """(prompt ids, completion ids) -> the completion's text as it continues the prompt's text
    (leading space kept: the records' `generated` is stripped, as the MaxText generator did),
    decoded with the job's tokenizer as vLLM decodes (kdgen.engines.vllm_engine.stream_decoder)."""
    from kdgen.engines.vllm_engine import localize_model, stream_decoder
    from kdgen.prompts import load_tokenizer

    tok = load_tokenizer(localize_model(fp["tokenizer"]))
    stream = stream_decoder(tok)
    if stream is not None:
        return stream

    def decode(prompt_ids: list[int], completion_ids: list[int]) -> str:  # a slow tokenizer
        head = tok.decode(prompt_ids, skip_special_tokens=True)
        full = tok.decode(list(prompt_ids) + list(completion_ids), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else tok.decode(completion_ids, skip_special_tokens=True)

    return decode


def text_row(r: dict, decode) -> dict:
    """A prefix-mode record -> plain text: `prompt` (the prefix's text) + `completion` = `text`."""
    completion = decode(r["prompt_token_ids"], r["completion_token_ids"])
    return {"text": r["prefix"] + completion, "prompt": r["prefix"], "completion": completion,
            "parquet_file": r["parquet_file"], "row_idx": r["row_idx"], "sample_idx": r.get("sample_idx", 0)}


# ---------------------------------------------------------------- next-token top-k rows

def next_token_segments(r: dict, k: int):
    """A record with top-k at every token -> (ids, top_ids, top_lps) per sequence, where row t of
    the top-k is the distribution of token t + 1 (MaxText's and DistillKit's convention), one row
    per token that has a successor, plus, for scored segments, the row after the last token:
      score records: each segment; rows top_*[s+1 .. e-1] and next_top_*[j];
      generation records (PROMPT_LOGPROBS): prompt + completion ids; rows prompt_top_*[1:] and
      top_* (no distribution was computed after the last generated token)."""
    if "token_ids" in r:
        ids = r["token_ids"]
        starts = r.get("segment_starts", [0])
        for j, (s, e) in enumerate(zip(starts, starts[1:] + [len(ids)])):
            yield (ids[s:e], r["top_token_ids"][s + 1:e] + [r["next_top_token_ids"][j]],
                   r["top_logprobs"][s + 1:e] + [r["next_top_logprobs"][j]])
        return
    src = r.get("metadata", {}) if "conversations" in r else r
    ids = src.get("prompt_token_ids", r.get("prompt_token_ids"))
    if ids is None or "prompt_top_token_ids" not in src:
        raise ExportError(f"{row_name(r)}: the record has no prompt top-k (run with --prompt_logprobs)")
    yield (ids + src.get("completion_token_ids", r.get("completion_token_ids", [])),
           src["prompt_top_token_ids"][1:] + src["top_token_ids"], src["prompt_top_logprobs"][1:] + src["top_logprobs"])


def row_name(r: dict) -> str:
    meta = r.get("metadata") or {}
    return f"{r.get('parquet_file', meta.get('parquet_file'))} row {r.get('row_idx', meta.get('idx'))}"


def checked_rows(r: dict, top_ids: list, top_lps: list, k: int) -> np.ndarray:
    """The top-k logprobs as float32 [rows, k], after checking every row holds k entries."""
    bad = next((t for t, row in enumerate(top_ids) if len(row) != k), None)
    if bad is not None:
        raise ExportError(f"{row_name(r)}: top-k row {bad} has {len(top_ids[bad])} entries, not {k}")
    values = np.asarray(top_lps, dtype=np.float32).reshape(len(top_ids), k)
    if np.isnan(values).any():  # a null logprob (float16 cannot hold it: never expected)
        raise ExportError(f"{row_name(r)}: a top-k logprob is missing")
    return values


def write_distillkit(path: str, parts, k: int) -> int:
    """DistillKit's uncompressed offline rows (its LogprobCompressor.decompress_to_sparse takes
    `token_ids` / `top_values` as they are): input_ids [L], token_ids and top_values [L-1, k], row j
    the teacher's raw top-k logprobs of input_ids[j + 1], as its capture script
    (sample_logits_vllm.py: vLLM prompt_logprobs without the empty first row) stores them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("token_ids", pa.list_(pa.list_(pa.int64()))),
                        ("top_values", pa.list_(pa.list_(pa.float32())))])
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as pw:
        for records in parts:
            rows = {"input_ids": [], "token_ids": [], "top_values": []}
            for r in records:
                for ids, top_ids, top_lps in next_token_segments(r, k):
                    if "token_ids" in r:  # scored: DistillKit keeps no row after the last token
                        top_ids, top_lps = top_ids[:-1], top_lps[:-1]
                    values = checked_rows(r, top_ids, top_lps, k)
                    rows["input_ids"].append(ids)
                    rows["token_ids"].append(top_ids)
                    rows["top_values"].append(values.tolist())
                    n += 1
            if rows["input_ids"]:
                pw.write_table(pa.table(rows, schema=schema))
    return n


# ---------------------------------------------------------------- axolotl-kd

def axolotl_row(r: dict, k: int) -> dict:
    """A generation record -> one tokenized row of Axolotl's KD dataset, as its KD chat-template
    strategy leaves it for DataCollatorForKD and the KD trainer: input_ids = prompt + completion
    ids (the teacher's tokens: no re-templating), labels -100 over the prompt, and L rows of k where
    row t is compared with the student's output at position t, i.e. the teacher's distribution of
    input_ids[t + 1]. The completion's top-k fill rows P-1 .. L-2 (completion token i was drawn
    from row P-1+i); every other row is Axolotl's own filler (ids 0..k-1, -inf, mask 0). Values are
    the stored top-k logprobs renormalized over the k (log-softmax), as Axolotl's loader does."""
    src = r.get("metadata", {}) if "conversations" in r else r
    prompt, completion = src["prompt_token_ids"], src["completion_token_ids"]
    top_ids = src["top_token_ids"]
    values = checked_rows(r, top_ids, src["top_logprobs"], k)
    if len(top_ids) != len(completion) or not prompt:
        raise ExportError(f"{row_name(r)}: {len(top_ids)} top-k rows for {len(completion)} completion tokens "
                          f"after {len(prompt)} prompt tokens")
    values = values - np.logaddexp.reduce(values, axis=1, keepdims=True)
    p, n = len(prompt), len(completion)
    filler = (list(range(k)), [float("-inf")] * k, [0] * k)
    before, after = p - 1, 1  # rows 0 .. P-2 and row L-1 (nothing was computed after the last token)
    return {
        "input_ids": list(prompt) + list(completion),
        "labels": [-100] * p + list(completion),
        "attention_mask": [1] * (p + n),
        "target_token_ids": [filler[0]] * before + [list(x) for x in top_ids] + [filler[0]] * after,
        "target_logprobs": [filler[1]] * before + values.tolist() + [filler[1]] * after,
        "target_mask": [filler[2]] * before + [[1] * k] * n + [filler[2]] * after,
    }


def write_axolotl(path: str, parts, k: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ints = pa.list_(pa.int64())
    schema = pa.schema([("input_ids", ints), ("labels", ints), ("attention_mask", ints),
                        ("target_token_ids", pa.list_(ints)), ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
                        ("target_mask", pa.list_(ints))])
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as pw:
        for records in parts:
            rows = [axolotl_row(r, k) for r in records]
            if rows:
                pw.write_table(pa.Table.from_pylist(rows, schema=schema))
                n += len(rows)
    return n


# ---------------------------------------------------------------- maxtext-offline

def maxtext_examples(r: dict, k: int):
    """A record with top-k at every token -> one tf.train.Example per sequence, in the layout of
    MaxText's save_top_k_teacher_logits.py: `inputs` [L] and, per position t, the teacher's top-k
    of the distribution of the token after t: `top_k_logits` [L*k] (float32) and `top_k_indices`
    [L*k] (int64), plus `sequence_hash` and the fields that script saves by default
    (inputs_position, inputs_segmentation, targets, targets_segmentation) for an unpacked sequence.
    A generation record's last token has no row (nothing was computed after it), so its example's
    inputs stop before it: the last token is still every other position's target."""
    from kdgen.export import tfexample

    for ids, top_ids, top_lps in next_token_segments(r, k):
        if len(top_ids) < len(ids):
            ids = ids[:len(top_ids)]
        values = checked_rows(r, top_ids, top_lps, k)
        inputs = np.asarray(ids, dtype=np.int64)
        n = len(inputs)
        seg = np.ones(n, dtype=np.int64)
        yield tfexample.example({
            "inputs": inputs,
            "top_k_logits": values,
            "top_k_indices": np.asarray(top_ids, dtype=np.int64),
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

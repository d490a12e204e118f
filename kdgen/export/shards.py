"""`kdgen export OUT --to TARGET --dest DIR`: a job's committed chunk objects -> trainer-ready shards.

The shards are planned once, in DEST/.kdgen_manifest.json (the chunk objects, i.e. row ranges, of
every shard); a rerun follows that plan and writes only the shards not there yet, each whole in
one create, so reruns are idempotent and an interrupted export resumes. What each target needs is
in targets.py, its rows in rows.py and topk.py; formats and alignment: docs/outputs.md ("Exports").
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kdgen import storage
from kdgen.config import FILE_FORMATS
from kdgen.corpus import dataset, jobfile
from kdgen.export import rows, topk
from kdgen.export.targets import TARGETS, ExportError, check_target, shard_name
from kdgen.records import chunk_object, naming
from kdgen.records.parquet_codec import EXPORT_TYPES

log = logging.getLogger(__name__)

MANIFEST = ".kdgen_manifest.json"
TOPK_WRITERS = {"maxtext-offline": topk.write_maxtext, "distillkit": topk.write_distillkit,
                "axolotl-kd": topk.write_axolotl}


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
        if e.get("type") == "file" and naming.parse_object_name(name):
            sizes[name] = int(e.get("size") or 0)
    return sizes


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


def chunk_entry(name: str, files: dict[str, str]) -> dict:
    base, _ = naming.parse_object_name(name)
    stem, start, end = dataset.parse_chunk_name(base)
    return {"object": name, "parquet_file": files.get(stem), "start": start, "end": end}


# ---------------------------------------------------------------- the command

def export(out: str, to: str, dest: str, shard_mb: float = 256.0, allow_partial: bool = False,
           file_format: str = "jsonl", dataset_path: str | None = None, workers: int = 4) -> Summary:
    if to not in TARGETS:
        raise ExportError(f"--to must be one of {TARGETS}, got {to!r}")
    if file_format not in FILE_FORMATS:
        raise ExportError(f"--file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if to in ("parquet", "distillkit", "axolotl-kd"):
        file_format = "parquet"
    if shard_mb <= 0:
        raise ExportError(f"--shard_mb must be > 0, got {shard_mb}")
    job = jobfile.read_body(out)
    fp = job["fingerprint"]
    check_target(fp, to)
    fmt = fp.get("output_file_format", "jsonl")
    plan = jobfile.job_plan(out, dataset_path)  # the corpus pinned in _job.json, not the files found now
    sizes = object_sizes(out)
    planned = {f"{ch.name}.{fmt}": ch for ch in plan.chunks}
    present = [n for n in planned if n in sizes]
    missing = [ch for n, ch in planned.items() if n not in sizes]
    if missing:
        n_rows = sum(ch.num_rows for ch in missing)
        msg = (f"{out}: {len(missing)} of {len(planned)} chunks ({n_rows} of {plan.num_rows} rows) are not committed "
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
        window = [pool.submit(chunk_object.read_chunk_object, u) for u in urls[:workers]]
        for i in range(len(urls)):
            part = window.pop(0).result()
            if i + workers < len(urls):
                window.append(pool.submit(chunk_object.read_chunk_object, urls[i + workers]))
            yield part


def build_shard(out: str, to: str, fp: dict, shard: dict, file_format: str, workers: int) -> tuple[bytes, int]:
    """One shard's bytes, written chunk object by chunk object to a local temp file."""
    urls = [storage.join(out, c["object"]) for c in shard["chunks"]]
    parts = (records for records, _ in read_in_order(urls, workers))
    with tempfile.TemporaryDirectory(prefix="kdgen-export-") as d:
        path = os.path.join(d, shard["name"])
        if to in TOPK_WRITERS:
            n = TOPK_WRITERS[to](path, parts, fp["logprobs"])
        elif to == "messages":
            n = rows.write_rows(path, ([rows.messages_row(r, fp) for r in recs] for recs in parts), file_format,
                                rows.export_columns(to), EXPORT_TYPES[to])
        elif to == "text":
            decode = rows.completion_decoder(fp)
            n = rows.write_rows(path, ([rows.text_row(r, decode) for r in recs] for recs in parts), file_format,
                                rows.export_columns(to), EXPORT_TYPES[to])
        else:
            n = rows.write_rows(path, parts, "parquet", rows.record_columns(fp))
        with open(path, "rb") as f:
            return f.read(), n

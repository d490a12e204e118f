"""`kdgen audit`: reads every chunk object of an output and checks that each planned row is
covered exactly once per sample, or by an error record of the row's own data; names gaps,
duplicates, bad objects and objects it cannot account for. `--repair` moves bad objects aside so
that the next run generates them again. See docs/integrity.md.
"""

from __future__ import annotations

import collections
import json
import posixpath
import time
from dataclasses import dataclass, field

from kdgen import storage
from kdgen.corpus import dataset, jobfile
from kdgen.fleet import partial
from kdgen.prompts import DATA_ERROR_KINDS
from kdgen.records import chunk_object, naming, schema

BAD_DIR = "_bad"  # chunk objects that `kdgen audit --repair` moved aside


def legacy_errors(out: str, obj: str) -> dict[int, dict]:
    """Layout 1 (no "layout" in _job.json): a chunk's failed rows, from OUT/_errors/<name>.jsonl."""
    url = naming.errors_index_url(out, obj)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return {}
    return {e["row_idx"]: e for e in (json.loads(line) for line in data.splitlines() if line.strip())}


def error_kind(e: dict) -> str:
    """The kind of an error record. A quarantined row (its reason starts with
    partial.QUARANTINE_PREFIX) is "quarantined", whatever kind its writer gave it, when its reason
    says that rows of its chunk finished (partial.PROOF_MARK), else "quarantined_unproven" (older
    kdgen quarantined rows of a job-wide failure: not a data error). Records written
    before kinds existed have none: those that say a chunk could not be read are classed "read"
    (older kdgen recorded storage failures that way), the others "data"."""
    reason = str(e.get("error", ""))
    if reason.startswith(partial.QUARANTINE_PREFIX):  # only isolation with proof makes it the row's fault
        return "quarantined" if partial.PROOF_MARK in reason else "quarantined_unproven"
    kind = e.get("error_kind")
    if kind:
        return str(kind)
    return "read" if reason.startswith("could not read rows ") else "data"


def audit(out: str, dataset_path: str | None = None, max_listed: int = 20) -> dict:
    """Every planned row covered exactly once per sample, or by an error record of the row itself
    (its own data, or a quarantine: the engine died on it alone, MAX_CHUNK_ATTEMPTS times)? Error
    records of another kind (a storage or server failure recorded as a row error by an older kdgen)
    fail the audit: those rows need generating again. Reads the chunk objects (records and error
    rows); `_errors/` only for outputs older than chunk objects holding errors (no "layout" in
    _job.json). A chunk object that does not decode, does not match its stated hash, or holds a
    record of another file or row range is a bad object: the audit fails naming it, and `kdgen
    audit --repair` (repair()) moves it aside so that the next run generates it again. Objects
    older than chunk hashes count as not verified (reported, not failing)."""
    job = jobfile.read_body(out)
    fp = job.get("fingerprint")
    if not isinstance(fp, dict):
        raise ValueError(f"{jobfile.job_url(out)}: has no settings fingerprint")
    fmt = fp.get("output_file_format", "jsonl")
    p = jobfile.job_plan(out, dataset_path)
    names = set(storage.list_names(out))
    planned = {f"{ch.name}.{fmt}" for ch in p.chunks}
    # Records name their file by the URL it had when they were made: the pin holds that URL unless
    # the pin was made later, over existing chunks (a version-1 job file, or `kdgen adopt`).
    corpus = job.get("corpus") if isinstance(job.get("corpus"), dict) else {}
    urls_pinned_at_start = bool(corpus) and "adopted_at" not in corpus and not job.get("adopted")
    found = Findings()
    for ch in sorted(p.chunks, key=lambda c: c.name):
        obj = f"{ch.name}.{fmt}"
        if obj not in names:
            found.missing.append(ch.name)
            continue
        check_chunk(out, obj, ch, found, n_samples=fp.get("num_samples", 1), legacy="layout" not in job,
                    exact_urls=urls_pinned_at_start)
    unexpected = sorted(n for n in names if naming.parse_object_name(n) and n not in planned)
    ok = not (found.missing or found.duplicates or found.gaps or unexpected or found.not_data or found.bad)
    return {
        "ok": ok,
        "extensions": len(job.get("corpus", {}).get("extensions", [])),
        "adopted": job.get("adopted", []),
        "chunks_planned": len(p.chunks),
        "rows_planned": p.num_rows,
        "rows_ok": found.rows_ok,
        "rows_failed": len(found.failed),
        "missing_chunks": found.missing,
        "bad_objects": found.bad,
        "chunks_not_verified": found.unhashed,
        "gaps": found.gaps[:max_listed],
        "num_gaps": len(found.gaps),
        "duplicates": found.duplicates[:max_listed],
        "num_duplicates": len(found.duplicates),
        "unexpected_objects": unexpected,
        "failed_rows": found.failed[:max_listed],
        "rows_failed_not_data": len(found.not_data),
        "not_data_errors": found.not_data[:max_listed],
    }


@dataclass
class Findings:
    """What the audit found so far, chunk by chunk."""

    missing: list = field(default_factory=list)
    duplicates: list = field(default_factory=list)
    gaps: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # error records of the rows' own data
    not_data: list = field(default_factory=list)  # error records of another kind
    bad: list = field(default_factory=list)
    rows_ok: int = 0
    unhashed: int = 0


def check_chunk(out: str, obj: str, ch: dataset.Chunk, found: Findings, n_samples: int, legacy: bool,
                exact_urls: bool) -> None:
    """Account for every row of one chunk object: complete, failed (an error record), a gap or a
    duplicate; a bad object is recorded as such."""
    try:
        records, errs, hashed = chunk_object.read_chunk_checked(storage.join(out, obj))
        check_membership(ch, records + errs, exact_urls=exact_urls)
    except chunk_object.BadChunkObject as e:
        found.bad.append({"object": obj, "reason": str(e).removeprefix(storage.join(out, obj) + ": ")})
        return
    found.unhashed += not hashed
    counts = collections.Counter(schema.row_key(r) for r in records)
    errors = {e["row_idx"]: e for e in errs}
    if legacy:
        for row, e in legacy_errors(out, obj).items():
            errors.setdefault(row, e)
    for row in range(ch.start, ch.end):
        got = [counts.pop((row, s), 0) for s in range(n_samples)]
        if row in errors and not any(got):
            e = errors[row]
            f = {"chunk": ch.name, "row_idx": row, "error": e["error"], "error_kind": error_kind(e)}
            (found.failed if f["error_kind"] in DATA_ERROR_KINDS else found.not_data).append(f)
        elif all(g == 1 for g in got):
            found.rows_ok += 1
        elif any(g > 1 for g in got):
            found.duplicates.append({"chunk": ch.name, "row_idx": row, "samples": got})
        else:
            found.gaps.append({"chunk": ch.name, "row_idx": row, "samples": got})
    for (row, s), n in counts.items():  # samples outside num_samples
        found.duplicates.append({"chunk": ch.name, "row_idx": row, "sample_idx": s, "count": n,
                                 "outside_range": True})


def check_membership(ch: dataset.Chunk, lines: list[dict], exact_urls: bool) -> None:
    """Every record and error line of a chunk object names the chunk's file and a row of its
    range (an object copied over from another chunk is bad). Without exact_urls (the files may
    have moved since the records were made) only the file names are compared."""
    for r in lines:
        meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        file = r.get("parquet_file", meta.get("parquet_file"))
        try:
            row = schema.row_key(r)[0]
        except (KeyError, TypeError):
            row = None
        same_file = file == ch.file if exact_urls else posixpath.basename(str(file)) == posixpath.basename(ch.file)
        if not same_file or not isinstance(row, int) or not ch.start <= row < ch.end:
            raise chunk_object.BadChunkObject(f"holds a record of {file} row {row}, outside this chunk "
                                        f"({ch.file} rows {ch.start}-{ch.end})")


def repair(out: str, report: dict) -> list[str]:
    """Move the audit's bad chunk objects aside to OUT/_bad/ (with a .why.json holding the reason),
    so that the next run generates those chunks again. Returns the names moved."""
    moved = []
    for b in report["bad_objects"]:
        src = storage.join(out, b["object"])
        try:
            data = storage.read_bytes(src)
        except FileNotFoundError:
            continue
        dest = storage.join(out, BAD_DIR, b["object"])
        if not storage.create_if_absent(dest, data):  # moved aside before: keep both copies
            dest = storage.join(out, BAD_DIR, f"{time.time_ns()}-{b['object']}")
            storage.write_bytes(dest, data)
        storage.write_bytes(dest + ".why.json", json.dumps({"object": b["object"], "reason": b["reason"],
                                                            "moved_at": time.time()}).encode())
        storage.delete(src)
        moved.append(b["object"])
    return moved


def format_audit(r: dict) -> str:
    head = "OK" if r["ok"] else "FAILED"
    lines = [
        f"audit {head}: {r['rows_ok']}/{r['rows_planned']} rows complete, {r['rows_failed']} failed rows "
        f"(recorded), {len(r['missing_chunks'])} of {r['chunks_planned']} chunks missing, "
        f"{r['num_gaps']} rows with missing samples, {r['num_duplicates']} duplicates, "
        f"{len(r['unexpected_objects'])} unexpected objects, {r['rows_failed_not_data']} rows recorded as failed "
        f"for a reason that is not their data, {len(r.get('bad_objects', []))} bad chunk objects"
        + (f"; {r['chunks_not_verified']} chunk objects not verified (written before chunk objects carried "
           f"a content hash)" if r.get("chunks_not_verified") else "")
        + (f"; the corpus was extended {r['extensions']} time(s)" if r.get("extensions") else "")
        + (f"; adopted {len(r['adopted'])} time(s) by `kdgen adopt` (chunks written before it were not pinned "
           f"by a job file)" if r.get("adopted") else "")]
    for b in r.get("bad_objects", []):
        lines.append(f"  bad chunk object {b['object']}: {b['reason']} (`kdgen audit --repair` moves it aside "
                     f"to generate it again)")
    for name in r["missing_chunks"][:20]:
        lines.append(f"  missing chunk {name}")
    for g in r["gaps"]:
        lines.append(f"  gap: {g}")
    for d in r["duplicates"]:
        lines.append(f"  duplicate: {d}")
    for u in r["unexpected_objects"][:20]:
        lines.append(f"  unexpected object {u}")
    for f in r["not_data_errors"]:
        lines.append(f"  not a data error ({f['error_kind']}), generate again: {f['chunk']} row {f['row_idx']}: "
                     f"{f['error']}")
    for f in r["failed_rows"]:
        lines.append(f"  failed row {f['chunk']} row {f['row_idx']}: {f['error']}")
    return "\n".join(lines)

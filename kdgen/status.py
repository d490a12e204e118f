"""`kdgen status` and `kdgen audit`: what an output directory holds, from listings and objects.

status: cheap (listings, leases, per-host progress objects): chunks done / leased / pending.
audit: reads every chunk object and error object and checks that each planned row is covered
exactly once per sample (or by an error record), listing gaps and duplicates.
"""

from __future__ import annotations

import collections
import json
import time

from kdgen import dataset, jobfile, storage, writer
from kdgen.claims import ClaimStore
from kdgen.prompts import DATA_ERROR_KINDS

HOSTS_DIR = "_hosts"


def read_job(out: str) -> dict:
    url = storage.join(out, writer.JOB_FILE)
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: {out} is not a kdgen output directory (yet)") from None


def host_reports(out: str) -> list[dict]:
    reports = []
    for name in storage.list_names(storage.join(out, HOSTS_DIR)):
        try:
            reports.append(json.loads(storage.read_bytes(storage.join(out, HOSTS_DIR, name))))
        except (ValueError, FileNotFoundError):
            continue
    return sorted(reports, key=lambda r: r.get("owner", ""))


def status(out: str, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    job = read_job(out)
    done = writer.finished_chunk_names(out)
    leases = ClaimStore(out, owner="status").list_leases()
    live = [lease for lease in leases if lease.get("name") not in done and lease.get("expires_at", 0) > now]
    expired = [lease for lease in leases if lease.get("name") not in done and lease.get("expires_at", 0) <= now]
    total = job.get("chunks")
    rows_done = sum(e - s for s, e in (dataset.parse_chunk_name(n)[1:] for n in done))
    errors = len(storage.list_names(storage.join(out, writer.ERRORS_DIR)))
    hosts = host_reports(out)
    return {
        "output_path": out,
        "chunks_total": total,
        "chunks_done": len(done),
        "chunks_leased": len(live),
        "chunks_expired_leases": len(expired),
        "chunks_pending": None if total is None else total - len(done) - len(live),
        "rows_total": job.get("rows"),
        "rows_done": rows_done,
        "chunks_with_error_rows": errors,
        "generated_tokens": sum(h.get("generated_tokens", 0) for h in hosts),
        "leases": [{"chunk": lease["name"], "owner": lease.get("owner"),
                    "expires_in_s": round(lease.get("expires_at", 0) - now, 1)} for lease in live],
        "hosts": [{**h, "last_seen_s_ago": round(now - h.get("updated_at", now), 1)} for h in hosts],
    }


def format_status(r: dict) -> str:
    lines = [
        f"{r['output_path']}: {r['chunks_done']}/{r['chunks_total']} chunks done, {r['chunks_leased']} leased, "
        f"{r['chunks_pending']} pending ({r['chunks_expired_leases']} with expired leases)",
        f"rows done {r['rows_done']}/{r['rows_total']}; generated tokens {r['generated_tokens']}; "
        f"chunks with error rows {r['chunks_with_error_rows']}",
    ]
    for lease in r["leases"][:20]:
        lines.append(f"  leased {lease['chunk']} by {lease['owner']}, expires in {lease['expires_in_s']:.0f} s")
    if len(r["leases"]) > 20:
        lines.append(f"  ... {len(r['leases']) - 20} more leases")
    for h in r["hosts"]:
        lines.append(
            f"  host {h.get('owner')}: {h.get('chunks', 0)} chunks, {h.get('rows', 0)} rows, "
            f"{h.get('rows_per_s', 0):.1f} rows/s, {h.get('tokens_per_s', 0):.0f} tok/s, "
            f"last seen {h['last_seen_s_ago']:.0f} s ago{' (finished)' if h.get('finished') else ''}")
    return "\n".join(lines)


def record_key(r: dict) -> tuple[int, int]:
    """(row_idx, sample_idx) of a sequence_kd or conversations record."""
    if "row_idx" in r:
        return r["row_idx"], r.get("sample_idx", 0)
    meta = r["metadata"]
    return meta["idx"], meta.get("sample_idx", 0)


def error_kind(e: dict) -> str:
    """The kind of an error record. Records written before kinds existed have none: those that say
    a chunk could not be read are classed "read" (older kdgen recorded storage failures that way),
    the others "data"."""
    kind = e.get("error_kind")
    if kind:
        return str(kind)
    return "read" if str(e.get("error", "")).startswith("could not read rows ") else "data"


def job_plan(out: str, dataset_path: str | None = None) -> dataset.Plan:
    """The plan of the job in OUT: from its corpus pin, or (job files of kdgen before the pin)
    from the files under dataset_path with the stems that kdgen used."""
    p = jobfile.pinned_plan(out)
    if p is not None:
        return p
    fp = read_job(out)["fingerprint"]
    found = dataset.discover(dataset_path or fp["dataset_path"])
    files = dataset.describe(found, dataset.legacy_file_stems([u for u, _ in found]))
    return dataset.plan_files(files, fp["chunk_size"], fp.get("seed", 0), fp.get("limit", 0))


def audit(out: str, dataset_path: str | None = None, max_listed: int = 20) -> dict:
    """Every planned row covered exactly once per sample, or by an error record of the row's own
    data? Error records of another kind (a storage or server failure recorded as a row error by
    an older kdgen) fail the audit: those rows need generating again."""
    job = read_job(out)
    fp = job["fingerprint"]
    p = job_plan(out, dataset_path)
    n_samples = fp.get("num_samples", 1)
    names = set(storage.list_names(out))
    error_names = set(storage.list_names(storage.join(out, writer.ERRORS_DIR)))
    planned = {ch.name + ".jsonl" for ch in p.chunks}
    missing, duplicates, gaps, failed, not_data = [], [], [], [], []
    rows_ok = 0
    for ch in sorted(p.chunks, key=lambda c: c.name):
        obj = ch.name + ".jsonl"
        if obj not in names:
            missing.append(ch.name)
            continue
        counts = collections.Counter()
        for line in storage.read_bytes(storage.join(out, obj)).splitlines():
            r = json.loads(line)
            if "error" in r.get("metadata", {}):
                continue  # conversations keep failed rows in line; they are counted from _errors/
            counts[record_key(r)] += 1
        errors = {}
        if obj in error_names:
            for line in storage.read_bytes(storage.join(out, writer.ERRORS_DIR, obj)).splitlines():
                e = json.loads(line)
                errors[e["row_idx"]] = e
        for row in range(ch.start, ch.end):
            got = [counts.pop((row, s), 0) for s in range(n_samples)]
            if row in errors and not any(got):
                e = errors[row]
                f = {"chunk": ch.name, "row_idx": row, "error": e["error"], "error_kind": error_kind(e)}
                (failed if f["error_kind"] in DATA_ERROR_KINDS else not_data).append(f)
            elif all(g == 1 for g in got):
                rows_ok += 1
            elif any(g > 1 for g in got):
                duplicates.append({"chunk": ch.name, "row_idx": row, "samples": got})
            else:
                gaps.append({"chunk": ch.name, "row_idx": row, "samples": got})
        for (row, s), n in counts.items():  # records for rows or samples outside the chunk
            duplicates.append({"chunk": ch.name, "row_idx": row, "sample_idx": s, "count": n, "outside_range": True})
    unexpected = sorted(n for n in names if dataset.parse_chunk_name(n) and n not in planned)
    ok = not (missing or duplicates or gaps or unexpected or not_data)
    return {
        "ok": ok,
        "extensions": len(job.get("corpus", {}).get("extensions", [])),
        "chunks_planned": len(p.chunks),
        "rows_planned": p.num_rows,
        "rows_ok": rows_ok,
        "rows_failed": len(failed),
        "missing_chunks": missing,
        "gaps": gaps[:max_listed],
        "num_gaps": len(gaps),
        "duplicates": duplicates[:max_listed],
        "num_duplicates": len(duplicates),
        "unexpected_objects": unexpected,
        "failed_rows": failed[:max_listed],
        "rows_failed_not_data": len(not_data),
        "not_data_errors": not_data[:max_listed],
    }


def format_audit(r: dict) -> str:
    head = "OK" if r["ok"] else "FAILED"
    lines = [
        f"audit {head}: {r['rows_ok']}/{r['rows_planned']} rows complete, {r['rows_failed']} failed rows "
        f"(recorded), {len(r['missing_chunks'])} of {r['chunks_planned']} chunks missing, "
        f"{r['num_gaps']} rows with missing samples, {r['num_duplicates']} duplicates, "
        f"{len(r['unexpected_objects'])} unexpected objects, {r['rows_failed_not_data']} rows recorded as failed "
        f"for a reason that is not their data" + (f"; the corpus was extended {r['extensions']} time(s)"
                                                  if r.get("extensions") else "")]
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

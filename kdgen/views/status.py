"""`kdgen status` and `kdgen audit`: what an output directory holds, from listings and objects.

status: cheap (listings, leases, per-host progress objects): chunks done / leased / pending.
audit: reads every chunk object (records and error rows, either file format) and checks that
each planned row is covered exactly once per sample (or by an error record), listing gaps and
duplicates.
"""

from __future__ import annotations

import collections
import json
import posixpath
import sys
import time

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus import jobfile
from kdgen.fleet import partial
from kdgen.records import writer
from kdgen.fleet.leases import ClaimStore
from kdgen.views.progress import unknown_token_warning
from kdgen.prompts import DATA_ERROR_KINDS

HOSTS_DIR = "_hosts"
BAD_DIR = "_bad"  # chunk objects that `kdgen audit --repair` moved aside


def read_job(out: str) -> dict:
    """OUT/_job.json; FileNotFoundError or ValueError naming it."""
    url = storage.join(out, writer.JOB_FILE)
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: {out} is not a kdgen output directory (yet)") from None


def host_reports(out: str, bad: list[dict] | None = None) -> list[dict]:
    """Every host's progress report; one that is not a report is named in `bad` and skipped."""
    reports = []
    for name in storage.list_names(storage.join(out, HOSTS_DIR)):
        url = storage.join(out, HOSTS_DIR, name)
        try:
            r = storage.read_json(url)
            for key in ("generated_tokens", "chunks", "rows", "rows_per_s", "tokens_per_s", "updated_at"):
                if not isinstance(r.get(key, 0), (int, float)) or isinstance(r.get(key, 0), bool):
                    raise ValueError(f"{key} is {r[key]!r}, not a number")
        except FileNotFoundError:
            continue
        except ValueError as e:
            if bad is not None:
                bad.append({"object": url, "reason": str(e).removeprefix(f"{url}: ")})
            continue
        reports.append(r)
    return sorted(reports, key=lambda r: str(r.get("owner", "")))


def _lease_ok(lease: dict) -> bool:
    t, attempt = lease.get("expires_at", 0), lease.get("attempt", 1)
    return (not lease.get("corrupt") and isinstance(t, (int, float)) and not isinstance(t, bool)
            and isinstance(attempt, int) and isinstance(lease.get("name"), str))


def status(out: str, now: float | None = None) -> dict:
    """What OUT holds. Shows what it can: a malformed object (job file, claim, host report) is
    named in `bad_objects` instead of stopping the report."""
    now = time.time() if now is None else now
    bad: list[dict] = []
    try:
        job = read_job(out)
    except ValueError as e:
        url = storage.join(out, writer.JOB_FILE)
        bad.append({"object": url, "reason": str(e).removeprefix(f"{url}: ")})
        job = {}
    done = writer.finished_chunk_names(out)
    claims = ClaimStore(out, owner="status")
    leases = []
    for lease in claims.list_leases():
        if _lease_ok(lease):
            leases.append(lease)
        else:
            bad.append({"object": claims.url(lease["name"]),
                        "reason": "not a readable claim" if lease.get("corrupt")
                        else f"expires_at {lease.get('expires_at')!r} or attempt {lease.get('attempt')!r} "
                             f"is not a number"})
    live = [lease for lease in leases if lease.get("name") not in done and not lease.get("released")
            and lease.get("expires_at", 0) > now]
    expired = [lease for lease in leases if lease.get("name") not in done and not lease.get("released")
               and lease.get("expires_at", 0) <= now]
    total = job.get("chunks")
    total = total if isinstance(total, int) else None
    rows_done = sum(e - s for s, e in (dataset.parse_chunk_name(n)[1:] for n in done))
    errors = len(storage.list_names(storage.join(out, writer.ERRORS_DIR)))
    hosts = host_reports(out, bad)
    return {
        "output_path": out,
        "chunks_total": total,
        "chunks_done": len(done),
        "chunks_leased": len(live),
        "chunks_expired_leases": len(expired),
        "chunks_pending": None if total is None else total - len(done) - len(live),
        "rows_total": job.get("rows") if isinstance(job.get("rows"), int) else None,
        "rows_done": rows_done,
        "chunks_with_error_rows": errors,
        "generated_tokens": sum(h.get("generated_tokens", 0) for h in hosts),
        "prompt_tokens": sum(h.get("prompt_tokens", 0) for h in hosts),
        "unknown_prompt_tokens": sum(h.get("unknown_prompt_tokens", 0) for h in hosts),
        "leases": [{"chunk": lease["name"], "owner": lease.get("owner"),
                    "expires_in_s": round(lease.get("expires_at", 0) - now, 1)} for lease in live],
        "hosts": [{**h, "last_seen_s_ago": round(now - h.get("updated_at", now), 1)} for h in hosts],
        **retried_chunks(out, done, leases, now),
        "bad_objects": bad,
    }


def retried_chunks(out: str, done: set[str], leases: list[dict], now: float) -> dict:
    """Chunks with more than one attempt (from their claims while unfinished, from OUT/_faults once
    committed) and the rows quarantined in them (kdgen.fleet.partial)."""
    chunks = {}
    for lease in leases:
        if lease.get("name") in done or int(lease.get("attempt", 1)) <= 1:
            continue
        state = ("pending" if lease.get("released") or lease.get("expires_at", 0) <= now
                 else f"leased by {lease.get('owner')}")
        chunks[lease["name"]] = {"chunk": lease["name"], "attempt": int(lease["attempt"]), "state": state,
                                 "quarantined": []}
    for f in partial.read_faults(out):
        if f.get("chunk") in done:
            chunks[f["chunk"]] = {"chunk": f["chunk"], "attempt": int(f.get("attempt", 1)), "state": "done",
                                  "quarantined": f.get("quarantined", [])}
    retried = sorted(chunks.values(), key=lambda x: (-x["attempt"], x["chunk"]))
    return {"chunks_retried": retried, "rows_quarantined": sum(len(x["quarantined"]) for x in retried)}


def format_status(r: dict) -> str:
    lines = [
        f"{r['output_path']}: {r['chunks_done']}/{r['chunks_total']} chunks done, {r['chunks_leased']} leased, "
        f"{r['chunks_pending']} pending ({r['chunks_expired_leases']} with expired leases)",
        f"rows done {r['rows_done']}/{r['rows_total']}; generated tokens {r['generated_tokens']}; "
        f"chunks with error rows {r['chunks_with_error_rows']}",
    ]
    unknown = unknown_token_warning(r.get("unknown_prompt_tokens", 0), r.get("prompt_tokens", 0))
    if unknown:
        lines.append(unknown.lstrip("; "))
    for lease in r["leases"][:20]:
        lines.append(f"  leased {lease['chunk']} by {lease['owner']}, expires in {lease['expires_in_s']:.0f} s")
    if len(r["leases"]) > 20:
        lines.append(f"  ... {len(r['leases']) - 20} more leases")
    if r.get("chunks_retried"):
        lines.append(f"chunks with more than one attempt: {len(r['chunks_retried'])}; "
                     f"rows quarantined: {r['rows_quarantined']}")
        for x in r["chunks_retried"][:20]:
            q = x["quarantined"]
            lines.append(f"  {x['chunk']}: attempt {x['attempt']}, {x['state']}"
                         + (f", {len(q)} rows quarantined" if q else ""))
            for row in q[:5]:
                lines.append(f"    row {row['row_idx']}: {row['error']}")
    for h in r["hosts"][:MAX_HOST_LINES]:
        lines.append(
            f"  host {h.get('owner')}: {h.get('chunks', 0)} chunks, {h.get('rows', 0)} rows, "
            f"{h.get('rows_per_s', 0):.1f} rows/s, {h.get('tokens_per_s', 0):.0f} tok/s, "
            f"last seen {h['last_seen_s_ago']:.0f} s ago{' (finished)' if h.get('finished') else ''}")
    if len(r["hosts"]) > MAX_HOST_LINES:
        lines.append(f"  ... {len(r['hosts']) - MAX_HOST_LINES} more hosts")
    for b in r.get("bad_objects", []):
        lines.append(f"  malformed object, not counted: {b['object']}: {b['reason']}")
    slow = slowest_host(r["hosts"])
    if slow is not None:
        lines.append(f"slowest host: {slow['owner']} at {slow.get('rows_per_s', 0):.1f} rows/s "
                     f"({slow.get('tokens_per_s', 0):.0f} tok/s; median of working hosts "
                     f"{slow['median_rows_per_s']:.1f} rows/s), last seen {slow['last_seen_s_ago']:.0f} s ago")
    return "\n".join(lines)


MAX_HOST_LINES = 20


def slowest_host(hosts: list[dict]) -> dict | None:
    """The working (not finished) host with the lowest row rate, when two or more are working."""
    working = [h for h in hosts if not h.get("finished")]
    if len(working) < 2:
        return None
    rates = sorted(h.get("rows_per_s", 0.0) for h in working)
    slow = min(working, key=lambda h: h.get("rows_per_s", 0.0))
    return {**slow, "median_rows_per_s": rates[len(rates) // 2]}


def is_done(r: dict) -> bool:
    return r["chunks_total"] is not None and r["chunks_done"] >= r["chunks_total"]


def watch(out: str, every: float = 5.0, count: int = 0, as_json: bool = False, stream=None) -> int:
    """Print the status every `every` seconds until every chunk is done, or `count` refreshes;
    on a terminal each refresh replaces the last. Returns the number of refreshes printed."""
    stream = sys.stdout if stream is None else stream
    terminal = bool(getattr(stream, "isatty", lambda: False)()) and not as_json
    n = 0
    while True:
        r = status(out)
        n += 1
        done = is_done(r)
        if as_json:
            print(json.dumps({**r, "refresh": n, "done": done}), file=stream, flush=True)
        else:
            if terminal:
                stream.write("\x1b[H\x1b[2J")  # cursor home, clear screen
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            tail = "job done: every chunk is stored" if done else (
                f"refresh {n}/{count}" if count else f"refresh {n}; every {every:g} s, Ctrl-C to stop")
            print(f"== {stamp} kdgen status --watch: {tail}", file=stream)
            print(format_status(r), file=stream, flush=True)
        if done or (count and n >= count):
            return n
        time.sleep(every)


def record_key(r: dict) -> tuple[int, int]:
    """(row_idx, sample_idx) of a sequence_kd or conversations record."""
    return writer.row_key(r)


def legacy_errors(out: str, obj: str) -> dict[int, dict]:
    """Layout 1 (no "layout" in _job.json): a chunk's failed rows, from OUT/_errors/<name>.jsonl."""
    url = storage.join(out, writer.ERRORS_DIR, obj.rsplit(".", 1)[0] + ".jsonl")
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
    """Every planned row covered exactly once per sample, or by an error record of the row itself
    (its own data, or a quarantine: the engine died on it alone, MAX_CHUNK_ATTEMPTS times)? Error
    records of another kind (a storage or server failure recorded as a row error by an older
    kdgen) fail the audit: those rows need generating again.

    Reads only the chunk objects (their records and their error rows); `_errors/` is consulted
    only for outputs written before chunk objects held their errors (no "layout" in _job.json).

    A chunk object that does not decode, whose content does not match its stated hash, or that
    holds a record of another file or row range is a bad object: the audit fails naming it, and
    `kdgen audit --repair` (repair()) moves it aside so that the next run generates it again.
    Objects written before chunk objects carried a hash are counted as not verified (reported,
    not failing)."""
    job = read_job(out)
    fp = job.get("fingerprint")
    if not isinstance(fp, dict):
        raise ValueError(f"{storage.join(out, writer.JOB_FILE)}: has no settings fingerprint")
    legacy = "layout" not in job
    fmt = fp.get("output_file_format", "jsonl")
    p = job_plan(out, dataset_path)
    n_samples = fp.get("num_samples", 1)
    names = set(storage.list_names(out))
    planned = {f"{ch.name}.{fmt}" for ch in p.chunks}
    # Records name their file by the URL it had when they were made: the pin holds that URL unless
    # the pin was made later, over existing chunks (a version-1 job file, or `kdgen adopt`).
    corpus = job.get("corpus") if isinstance(job.get("corpus"), dict) else {}
    urls_pinned_at_start = bool(corpus) and "adopted_at" not in corpus and not job.get("adopted")
    missing, duplicates, gaps, failed, not_data, bad = [], [], [], [], [], []
    rows_ok = unhashed = 0
    for ch in sorted(p.chunks, key=lambda c: c.name):
        obj = f"{ch.name}.{fmt}"
        if obj not in names:
            missing.append(ch.name)
            continue
        try:
            records, errs, hashed = writer.read_chunk_checked(storage.join(out, obj))
            check_membership(ch, records + errs, exact_urls=urls_pinned_at_start)
        except writer.BadChunkObject as e:
            bad.append({"object": obj, "reason": str(e).removeprefix(storage.join(out, obj) + ": ")})
            continue
        unhashed += not hashed
        counts = collections.Counter(writer.row_key(r) for r in records)
        errors = {e["row_idx"]: e for e in errs}
        if legacy:
            for row, e in legacy_errors(out, obj).items():
                errors.setdefault(row, e)
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
        for (row, s), n in counts.items():  # samples outside num_samples
            duplicates.append({"chunk": ch.name, "row_idx": row, "sample_idx": s, "count": n, "outside_range": True})
    unexpected = sorted(n for n in names if writer.parse_object_name(n) and n not in planned)
    ok = not (missing or duplicates or gaps or unexpected or not_data or bad)
    return {
        "ok": ok,
        "extensions": len(job.get("corpus", {}).get("extensions", [])),
        "adopted": job.get("adopted", []),
        "chunks_planned": len(p.chunks),
        "rows_planned": p.num_rows,
        "rows_ok": rows_ok,
        "rows_failed": len(failed),
        "missing_chunks": missing,
        "bad_objects": bad,
        "chunks_not_verified": unhashed,
        "gaps": gaps[:max_listed],
        "num_gaps": len(gaps),
        "duplicates": duplicates[:max_listed],
        "num_duplicates": len(duplicates),
        "unexpected_objects": unexpected,
        "failed_rows": failed[:max_listed],
        "rows_failed_not_data": len(not_data),
        "not_data_errors": not_data[:max_listed],
    }


def check_membership(ch: dataset.Chunk, lines: list[dict], exact_urls: bool) -> None:
    """Every record and error line of a chunk object names the chunk's file and a row of its
    range (an object copied over from another chunk is bad). Without exact_urls (the files may
    have moved since the records were made) only the file names are compared."""
    for r in lines:
        meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        file = r.get("parquet_file", meta.get("parquet_file"))
        try:
            row = writer.row_key(r)[0]
        except (KeyError, TypeError):
            row = None
        same_file = file == ch.file if exact_urls else posixpath.basename(str(file)) == posixpath.basename(ch.file)
        if not same_file or not isinstance(row, int) or not ch.start <= row < ch.end:
            raise writer.BadChunkObject(f"holds a record of {file} row {row}, outside this chunk "
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

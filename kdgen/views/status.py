"""`kdgen status`: what an output directory holds, cheaply, from listings and small objects
(leases, per-host progress reports, OUT/_faults): chunks done / leased / pending, rows, tokens,
retried chunks, the slowest host; `--watch` refreshes it. The audit that reads every chunk
object is views/audit.py. See docs/operations.md.
"""

from __future__ import annotations

import json
import sys
import time

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus import jobfile
from kdgen.fleet import partial
from kdgen.records import naming
from kdgen.fleet.leases import ClaimStore
from kdgen.views.progress import unknown_token_warning

HOSTS_DIR = "_hosts"


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
        job = jobfile.read_body(out)
    except ValueError as e:
        url = jobfile.job_url(out)
        bad.append({"object": url, "reason": str(e).removeprefix(f"{url}: ")})
        job = {}
    done = naming.finished_chunk_names(out)
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
    errors = len(storage.list_names(storage.join(out, naming.ERRORS_DIR)))
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

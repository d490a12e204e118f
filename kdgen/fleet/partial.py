"""Partial progress of a chunk: a cache of its finished rows, so that the next holder of the chunk
(this host after a restart, or any other) generates only the rows that had not finished.

    OUT/_partial/<chunk>/<fingerprint>-<take>-<seq:05d>.jsonl

One JSON header line (`kdgen_partial`, chunk, fingerprint, take, seq, owner, attempt, rows, sha256,
events), then one line per finished row. What a reader accepts: `load`; the events that count
engine deaths and quarantine poison rows: `History`. Why no interleaving of hosts, leases and
retries can duplicate or drop a row through it: docs/protocol.md#partial-progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kdgen import storage
from kdgen.json_lines import json_line

log = logging.getLogger(__name__)

PARTIAL_DIR = "_partial"
QUARANTINE_PREFIX = "the engine died on this row"  # error records of quarantined rows start so
# ... and a quarantine isolation proved says so: the row died alone while rows of its chunk
# finished on the same engine and settings (audit.error_kind; the audit fails on the others).
PROOF_MARK = "other rows of its chunk finished"
GROUPS_PER_LEVEL = 4


def chunk_dir(out: str, chunk_name: str) -> str:
    return storage.join(out, PARTIAL_DIR, chunk_name)


def prompt_hash(p) -> str:
    """What a cached row must have been generated from: the exact request."""
    key = [p.token_ids, p.max_tokens, getattr(p, "completion_start", None)]
    return hashlib.sha1(json.dumps(key, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass
class Row:
    """A finished row: its output records (or its error), and what it cost."""
    row_idx: int
    prompt_hash: str
    records: list[dict]
    error: str | None = None
    samples: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0

    def to_json(self) -> dict:
        return {"row_idx": self.row_idx, "prompt_hash": self.prompt_hash, "records": self.records,
                "error": self.error, "samples": self.samples, "generated_tokens": self.generated_tokens,
                "prompt_tokens": self.prompt_tokens}


@dataclass
class History:
    """A chunk's engine deaths, from every segment read plus this process's own events:
        {"died": [rows], "alone": bool, "intent": id|null, "reason": str, "proof": n}  rows in flight
            when the engine died in this process (alone: the only request in the engine)
        {"intent": id, "rows": [rows], "proof": n}  written BEFORE a group of rows is run alone in
            the engine, so a death that takes the whole process (kill -9, OOM, stall) still counts
        {"cancel": id}  that group was interrupted by a graceful stop (SIGTERM): it did not fail
    A row's death count is the died events naming it plus the intents naming it that no died or
    cancel event explains (the process vanished). A row is quarantined (an error record, "the
    engine died on this row N times: ...") when the engine died while it was alone in it, or when
    the process vanished twice while it was alone, and in either case rows of its chunk had
    finished (`proof`). Rules in full: docs/protocol.md#attempts-and-quarantine."""
    events: list[dict] = field(default_factory=list)

    def add(self, event: dict) -> dict:
        self.events.append(event)
        return event

    def _tally(self):
        died, solo_died, vanished, solo_vanished, reasons = {}, {}, {}, {}, {}
        unproven, proofs = {}, {}
        intents, intent_events, explained = {}, {}, set()
        for e in self.events:
            if "intent" in e and "rows" in e and "died" not in e:
                intents[e["intent"]] = e["rows"]
                intent_events[e["intent"]] = e
            elif "cancel" in e:
                explained.add(e["cancel"])
            elif "died" in e:
                if e.get("intent"):
                    explained.add(e["intent"])
                for r in e["died"]:
                    died[r] = died.get(r, 0) + 1
                    reasons[r] = e.get("reason", "")
                if e.get("alone") and len(e["died"]) == 1:
                    r = e["died"][0]
                    target = solo_died if _proof(e) else unproven
                    target[r] = target.get(r, 0) + 1
                    proofs[r] = max(proofs.get(r, 0), _proof(e))
        for i, rows in intents.items():
            if i in explained:
                continue
            for r in rows:
                vanished[r] = vanished.get(r, 0) + 1
                reasons.setdefault(r, "the process ended while it ran")
            if len(rows) == 1 and _proof(intent_events[i]):
                solo_vanished[rows[0]] = solo_vanished.get(rows[0], 0) + 1
                proofs[rows[0]] = max(proofs.get(rows[0], 0), _proof(intent_events[i]))
        return died, solo_died, vanished, solo_vanished, reasons, unproven, proofs

    def deaths(self) -> dict[int, int]:
        died, _, vanished, _, _, _, _ = self._tally()
        return {r: died.get(r, 0) + vanished.get(r, 0) for r in set(died) | set(vanished)}

    def quarantine(self) -> dict[int, str]:
        """Rows that killed the engine while alone in it, while other rows of the chunk had
        finished (the proof that the engine and the settings work): row -> error record text."""
        died, solo_died, vanished, solo_vanished, reasons, _, proofs = self._tally()
        out = {}
        for r in set(solo_died) | {r for r, n in solo_vanished.items() if n >= 2}:
            n = died.get(r, 0) + vanished.get(r, 0)
            out[r] = (f"{QUARANTINE_PREFIX} {n} times (the last time alone in the engine, while {proofs.get(r, 0)} "
                      f"{PROOF_MARK}): {reasons.get(r, '')}")
        return out

    def unproven(self) -> set[int]:
        """Rows that died alone in the engine before any row of their chunk had finished: maybe
        the row, maybe the engine or the settings. They run again after the others."""
        return set(self._tally()[5]) - set(self.quarantine())


def _proof(event: dict) -> int:
    """Rows of the chunk that had finished when this event was written (0 in events of older kdgen)."""
    n = event.get("proof", 0)
    return n if isinstance(n, int) and n > 0 else 0


def groups(rows: list[int], deaths: dict[int, int], last: set[int] = frozenset()) -> list[list[int]]:
    """Isolation groups of `rows` (the unfinished suspects): rows with the same death count in
    GROUPS_PER_LEVEL groups, the most suspect (highest count, smallest groups) first; rows in
    `last` (died alone, unproven) alone at the end, so that other rows can prove the engine works."""
    levels: dict[int, list[int]] = {}
    for r in rows:
        if r not in last:
            levels.setdefault(deaths.get(r, 0), []).append(r)
    out = []
    for d in sorted(levels, reverse=True):
        level = sorted(levels[d])
        size = max(1, math.ceil(len(level) / GROUPS_PER_LEVEL))
        out += [level[i:i + size] for i in range(0, len(level), size)]
    return out + [[r] for r in sorted(set(rows) & set(last))]


@dataclass
class Cached:
    rows: dict[int, Row]  # row_idx -> reusable row
    history: History
    segments: int = 0


def load(out: str, fingerprint: str, chunk, prompts) -> Cached:
    """Every reusable row of `chunk` and its history. A row is taken only from a segment of this
    chunk (its directory, and the header's `chunk`), with this job's fingerprint (name and header),
    whose row count and `sha256` (of the bytes after the header line) match its header and whose
    events all have the shapes `History` names (a torn, damaged or foreign segment is ignored whole,
    with a warning), for a row inside the chunk whose records all name that row, and only if its
    `prompt_hash` equals the hash of the prompt the reader built itself. Among several copies the
    first by name wins (all are complete outcomes of the same prompt). Never raises for a bad or
    vanished segment: a cache miss only costs time."""
    by_row = {p.row_idx: p for p in prompts}
    d = chunk_dir(out, chunk.name)
    names = [n for n in storage.list_names(d) if n.startswith(fingerprint + "-") and n.endswith(".jsonl")]
    rows: dict[int, Row] = {}
    history = History()
    used = 0
    for name in names:
        try:
            first, _, body = storage.read_bytes(storage.join(d, name)).partition(b"\n")
            head = json.loads(first)
            lines = body.splitlines()
            if (not isinstance(head, dict) or head.get("kdgen_partial") != 1 or head.get("chunk") != chunk.name
                    or head.get("fingerprint") != fingerprint or head.get("rows") != len(lines)):
                raise ValueError("header does not match this chunk, this job, or its own length")
            if head.get("sha256") != hashlib.sha256(body).hexdigest():
                raise ValueError("its rows do not match the checksum in its header")
            seg_rows = [json.loads(x) for x in lines]
            events = head.get("events") or []
            if not isinstance(events, list) or not all(map(_valid_event, events)):
                raise ValueError("an event is not one kdgen writes")
            if not all(isinstance(r, dict) for r in seg_rows):
                raise ValueError("a row line is not an object")
        except Exception as e:  # torn, foreign, or deleted since the listing
            log.warning("ignoring partial segment %s of %s: %s", name, chunk.name, _first_line(e))
            continue
        used += 1
        history.events += events
        for r in seg_rows:
            idx = r.get("row_idx")
            p = by_row.get(idx)
            if p is None or idx in rows or p.error is not None or r.get("prompt_hash") != prompt_hash(p):
                continue
            if not isinstance(r.get("records"), list) or not all(_record_of_row(x, idx) for x in r["records"]):
                continue
            rows[idx] = Row(idx, r["prompt_hash"], r["records"], r.get("error"), int(r.get("samples", 0)),
                            int(r.get("generated_tokens", 0)), int(r.get("prompt_tokens", 0)))
    return Cached(rows, history, used)


def _is_rows(x) -> bool:
    return isinstance(x, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in x)


def _valid_event(e) -> bool:
    """One of the event shapes `History` names (a malformed one could quarantine a row)."""
    if not isinstance(e, dict):
        return False
    if "died" in e:
        return (_is_rows(e["died"]) and isinstance(e.get("alone", False), bool)
                and isinstance(e.get("reason", ""), str) and isinstance(e.get("intent"), (str, type(None))))
    if "cancel" in e:
        return isinstance(e["cancel"], str)
    return isinstance(e.get("intent"), str) and _is_rows(e.get("rows"))


def _record_of_row(rec, idx: int) -> bool:
    meta = rec.get("metadata") if isinstance(rec, dict) else None
    return isinstance(rec, dict) and rec.get("row_idx", (meta or {}).get("idx") if isinstance(meta, dict) else None) == idx


class Segments:
    """Names and headers of one take's segments of one chunk: numbered, never overwritten."""

    def __init__(self, out: str, fingerprint: str, chunk_name: str, owner: str):
        self.dir = chunk_dir(out, chunk_name)
        self.fingerprint, self.chunk, self.owner = fingerprint, chunk_name, owner
        self.take = uuid.uuid4().hex[:12]
        self.seq = 0
        self.pending_events: list[dict] = []  # events since the last segment

    def next(self, attempt: int) -> tuple[str, dict]:
        """(URL, header without the row count) of the next segment; it carries the pending events."""
        head = {"kdgen_partial": 1, "chunk": self.chunk, "fingerprint": self.fingerprint, "take": self.take,
                "seq": self.seq, "owner": self.owner, "attempt": attempt, "events": self.pending_events}
        self.pending_events = []
        url = storage.join(self.dir, f"{self.fingerprint}-{self.take}-{self.seq:05d}.jsonl")
        self.seq += 1
        return url, head


def write_segment(url: str, head: dict, rows: list[Row], chunk_name: str) -> bool:
    body = "".join(json_line(r.to_json()) for r in rows).encode()
    head = {**head, "rows": len(rows), "sha256": hashlib.sha256(body).hexdigest()}
    return _write(url, json.dumps(head, ensure_ascii=False).encode() + b"\n" + body,
                  f"{len(rows)} finished rows of {chunk_name}")


class Saver:
    """Runs segment writes off the engine thread."""

    def __init__(self, workers: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdgen-partial")

    def submit(self, fn) -> Future:
        return self.pool.submit(fn)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _write(url: str, body: bytes, what: str) -> bool:
    try:
        storage.write_bytes(url, body)
        return True
    except Exception as e:  # a cache: losing it costs time, never a row
        log.warning("could not save %s to %s: %s", what, url, _first_line(e))
        return False


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def cleanup(out: str, chunk_name: str) -> None:
    """Delete a committed chunk's segments (best effort: leftovers are never read again)."""
    d = chunk_dir(out, chunk_name)
    try:
        for name in storage.list_names(d):
            storage.delete(storage.join(d, name))
        if not storage.is_remote(d):  # local: drop the emptied folder too
            os.rmdir(d.removeprefix("file://"))
    except OSError as e:
        log.debug("could not clean %s: %s", d, e)


FAULTS_DIR = "_faults"


def record_faults(out: str, chunk_name: str, attempt: int, quarantined: dict[int, str]) -> None:
    """OUT/_faults/<chunk>.json for `kdgen status`: a chunk committed after more than one attempt,
    or with quarantined rows (best effort; the chunk object holds the error records themselves)."""
    body = {"chunk": chunk_name, "attempt": attempt,
            "quarantined": [{"row_idx": r, "error": e} for r, e in sorted(quarantined.items())]}
    _write(storage.join(out, FAULTS_DIR, chunk_name + ".json"), json.dumps(body).encode(), "the fault record")


def read_faults(out: str) -> list[dict]:
    """The fault records of OUT; one that is not a fault record is skipped with a warning naming it."""
    d = storage.join(out, FAULTS_DIR)
    found = []
    for name in storage.list_names(d):
        url = storage.join(d, name)
        try:
            f = storage.read_json(url)
            q = f.get("quarantined", [])
            if (not isinstance(f.get("chunk"), str) or not isinstance(f.get("attempt", 1), int)
                    or not isinstance(q, list) or not all(isinstance(x, dict) and "row_idx" in x for x in q)):
                raise ValueError(f"{url}: not a fault record")
        except FileNotFoundError:
            continue
        except (ValueError, OSError) as e:
            log.warning("skipping %s", e)
            continue
        found.append(f)
    return found

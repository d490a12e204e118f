"""OUT/_job.json: the job's settings fingerprint and its pinned corpus (each input file's URL,
stem, size, version, footer digest and row count).

The first host creates it; after that it changes only by compare-and-swap. A run with other
settings, or over a corpus that changed, is refused; `--extend` pins new files; a version-1 job
file (no pin) is adopted by the first run; `kdgen adopt` pins chunk objects whose job file was
lost; a job that never got anywhere may be re-pinned. Design: docs/protocol.md ("The job file").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from kdgen import storage
from kdgen.corpus import dataset
from kdgen.corpus.dataset import FileInfo, Plan
from kdgen.records.naming import finished_chunk_names

log = logging.getLogger(__name__)

JOB_FILE = "_job.json"
CLAIMS_DIR = "_claims"  # as kdgen.fleet.leases writes them (read here without importing the fleet)
VERSION = 2
LATER_KEYS = ("dtype", "max_model_len", "endpoint_api")  # fingerprint keys that version 1 lacked


class FingerprintMismatch(RuntimeError):
    """OUT holds a job with other settings, or another corpus; the message says what differs."""


class CorpusMismatch(FingerprintMismatch):
    """A pinned input file is gone or changed, or new files appeared without --extend."""


def job_url(out: str) -> str:
    return storage.join(out, JOB_FILE)


def read(out: str) -> tuple[dict, str] | None:
    """(body, generation) of OUT/_job.json; None if there is none."""
    url = job_url(out)
    st = storage.stat(url)
    if st is None:
        return None
    try:
        body = json.loads(storage.read_bytes(url))
        if not isinstance(body, dict) or not isinstance(body.get("fingerprint"), dict):
            raise ValueError("no fingerprint")
        corpus = body.get("corpus", {})
        if not isinstance(corpus, dict) or not isinstance(corpus.get("files", []), list):
            raise ValueError("its corpus pin is not {files: [...]}")
        for d in corpus.get("files", []):
            if not isinstance(d, dict):
                raise ValueError("a pinned file is not an object")
            FileInfo.from_pin(d)  # KeyError, ValueError: not a pin
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise FingerprintMismatch(f"{url} is unreadable ({type(e).__name__}: {e}); move it away to start a new job "
                                  f"there") from None
    return body, st.generation


def read_body(out: str) -> dict:
    """OUT/_job.json as it is, for the views and the export (read() checks it for a run);
    FileNotFoundError or ValueError naming it."""
    url = job_url(out)
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} not found: {out} is not a kdgen output directory (yet)") from None


def _encode(body: dict) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode()


def check_fingerprint(out: str, body: dict, fingerprint: dict) -> None:
    old = body["fingerprint"]
    keys = set(old) | set(fingerprint)
    if "corpus" not in body:  # version 1 did not record these
        keys -= {k for k in LATER_KEYS if k not in old}
    diff = sorted(k for k in keys if old.get(k) != fingerprint.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff[:4])
        raise FingerprintMismatch(
            f"{out} holds output of a job with other settings ({shown}); refusing to mix them. "
            f"Use a new OUTPUT_PATH, or the old settings to resume.")


def _summary(files: list[FileInfo], chunk_size: int, seed: int, limit: int) -> tuple[Plan, dict]:
    p = dataset.plan_files(files, chunk_size, seed, limit)
    return p, {"plan": p.summary(), "chunks": len(p.chunks), "rows": p.num_rows}


def prepare(out: str, fingerprint: dict, dataset_path: str, chunk_size: int, seed: int = 0, limit: int = 0,
            columns: dict[str, str] | None = None, extend: bool = False, owner: str = "",
            extra: dict | None = None, adopt: bool = False, repin_after_s: float | None = None) -> Plan:
    """Create or check OUT/_job.json for these settings and the files under dataset_path; return
    the job's plan (the pinned files, read at the versions found now). `extra` (the chunk layout,
    chunk_object.job_layout) goes only into a new job file: one without it is an older layout's.
    OUT holding chunk objects but no job file (deleted or lost) is refused: their settings are
    unknown. `adopt` (`kdgen adopt`) pins them under these settings instead, after checking that
    each names a chunk of this plan, and records that in the job file's `adopted` list (time, host,
    number of chunks), which `kdgen audit` reports. With `repin_after_s` (the lease TTL), a job
    file of other settings is replaced when the job never got anywhere (see `repinnable`), by
    compare-and-swap."""
    found = dataset.discover(dataset_path)
    req = PinRequest(out, fingerprint, tuple(found), dataset.dataset_base(dataset_path, [u for u, _ in found]),
                     chunk_size, seed, limit, columns, extend, owner, extra or {}, adopt, repin_after_s)
    for _ in range(20):  # compare-and-swap loop: another host may update the job file meanwhile
        cur = read(out)
        if cur is None:
            p = _create(req)
        elif adopt:
            raise FingerprintMismatch(f"{job_url(out)} exists: nothing to adopt (`kdgen adopt` is for an output "
                                      f"whose job file was lost)")
        else:
            p = _check(req, *cur)
        if p is not None:
            return p
    raise storage.StorageError(f"{job_url(out)} kept changing under this host; try again")


@dataclass(frozen=True)
class PinRequest:
    """What prepare() was asked: the settings, the files found now and how to treat a job file."""

    out: str
    fingerprint: dict
    found: tuple  # (url, storage.Stat) of every corpus file found now
    base: str  # dataset.dataset_base: what stems are relative to
    chunk_size: int
    seed: int
    limit: int
    columns: dict[str, str] | None
    extend: bool
    owner: str
    extra: dict  # written only into a new job file (the chunk layout)
    adopt: bool
    repin_after_s: float | None

    def fresh_body(self) -> tuple[Plan, dict]:
        """The plan and job file body of these settings over the files found now."""
        files = dataset.describe(list(self.found), dataset.file_stems([u for u, _ in self.found], self.base),
                                 self.columns)
        p, totals = _summary(files, self.chunk_size, self.seed, self.limit)
        return p, {"version": VERSION, "fingerprint": self.fingerprint, "created_at": time.time(), **totals,
                   **self.extra, "corpus": {"base": self.base, "extensions": [],
                                            "files": [f.pin() for f in sorted(files, key=lambda f: f.url)]}}


def _create(req: PinRequest) -> Plan | None:
    """No job file: create it (or, with adopt, pin the chunk objects there); None if another host
    created one meanwhile."""
    out, url = req.out, job_url(req.out)
    held = _chunk_objects(out)
    if held and not req.adopt:
        raise FingerprintMismatch(
            f"{out} holds {len(held)} chunk objects but no {JOB_FILE}: the settings they were made with are "
            f"unknown; refusing to add to them. Use a new OUTPUT_PATH, or `kdgen adopt {out}` with the "
            f"settings they were made with")
    if req.adopt and not held:
        raise FingerprintMismatch(f"{out} holds no chunk objects: nothing to adopt; run the job instead")
    p, body = req.fresh_body()
    if req.adopt:
        strays = sorted(held - {ch.name for ch in p.chunks})
        if strays:
            raise FingerprintMismatch(
                f"{out} holds {len(strays)} chunk objects that are not chunks of this plan (e.g. {strays[0]}): "
                f"these settings (DATASET_PATH, CHUNK_SIZE, LIMIT) are not the ones they were made with")
        body["adopted"] = [{"at": time.time(), "by": req.owner, "chunks": len(held)}]
    if not storage.create_if_absent(url, _encode(body)):
        return None
    if req.adopt:
        log.warning("adopted %d chunk objects in %s under these settings (recorded in %s)", len(held), out, url)
    else:
        log.info("new job in %s: pinned %d input files (%s)", out, len(p.files), p.summary())
    return p


def _check(req: PinRequest, body: dict, generation) -> Plan | None:
    """A job file exists: check these settings and the files found against it (re-pin, adopt a
    version-1 file or extend it where allowed); None if it changed meanwhile."""
    out, url = req.out, job_url(req.out)
    try:
        check_fingerprint(out, body, req.fingerprint)
    except FingerprintMismatch:
        if req.repin_after_s is None or not repinnable(out, body, req.repin_after_s):
            raise
        p, new_body = req.fresh_body()
        new_body["repinned"] = list(body.get("repinned", [])) + [
            {"at": time.time(), "by": req.owner, "old_fingerprint": body["fingerprint"]}]
        if not storage.replace_if_generation(url, _encode(new_body), generation):
            return None
        log.warning("%s held other settings but no chunk object, claim or recent start: re-pinned it to "
                    "these settings (the old ones are kept under `repinned`)", url)
        return p
    if "corpus" not in body:
        new_body, p = _adopt(out, body, req.fingerprint, list(req.found), req.columns, req.chunk_size, req.seed,
                             req.limit)
        if not storage.replace_if_generation(url, _encode(new_body), generation):
            return None
        log.warning("%s was written by a kdgen without the corpus pin: pinned the %d files found now under "
                    "the output names that version used", url, len(p.files))
        return p
    pinned = [FileInfo.from_pin(d) for d in body["corpus"]["files"]]
    current, unpinned = verify(pinned, list(req.found), req.columns)
    if not unpinned:
        return dataset.plan_files(current, req.chunk_size, req.seed, req.limit)
    return _extend(req, body, generation, pinned, current, unpinned)


def _extend(req: PinRequest, body: dict, generation, pinned: list[FileInfo], current: list[FileInfo],
            unpinned: list) -> Plan | None:
    """Files found that the job file does not pin: refused, or pinned as new chunks with --extend."""
    url = job_url(req.out)
    if not req.extend:
        raise CorpusMismatch(
            f"{unpinned[0][0]} is not one of the {len(pinned)} input files pinned in {url} "
            f"({len(unpinned)} new file(s)); rerun with --extend (EXTEND=1) to add them as new chunks, "
            f"or use a new OUTPUT_PATH")
    if req.limit:
        raise CorpusMismatch(f"--extend cannot add files to a job with --limit {req.limit}: the limit would "
                             f"cut other rows; use a new OUTPUT_PATH")
    new_urls = [u for u, _ in unpinned]
    added = dataset.describe(unpinned, dataset.file_stems(new_urls, req.base), req.columns)
    dataset.check_unique_stems(pinned + added)
    p, totals = _summary(current + added, req.chunk_size, req.seed, req.limit)
    corpus = dict(body["corpus"])
    corpus["files"] = list(corpus["files"]) + [f.pin() for f in sorted(added, key=lambda f: f.url)]
    corpus["extensions"] = list(corpus.get("extensions", [])) + [
        {"at": time.time(), "by": req.owner, "files": sorted(new_urls), "rows": sum(f.num_rows for f in added)}]
    if not storage.replace_if_generation(url, _encode({**body, **totals, "corpus": corpus}), generation):
        return None
    log.warning("--extend: pinned %d new input files (%d rows) in %s; earlier output is kept as it is",
                len(added), sum(f.num_rows for f in added), url)
    return p


def _chunk_objects(out: str) -> set[str]:
    return finished_chunk_names(out)


def repinnable(out: str, body: dict, quiet_s: float) -> bool:
    """May a job file of other settings be replaced? Only when nothing was made under it: no chunk
    object, no claim that has not expired, and no host marked it started (mark_started) within
    quiet_s seconds (a host between its engine start and its first claim)."""
    started = body.get("started")
    if isinstance(started, dict):
        at = started.get("at")
        if not isinstance(at, (int, float)) or time.time() - at < quiet_s:
            return False
    elif started is not None:
        return False
    if _chunk_objects(out):
        return False
    claims_dir = storage.join(out, CLAIMS_DIR)
    for name in storage.list_names(claims_dir):
        try:
            claim = json.loads(storage.read_bytes(storage.join(claims_dir, name)))
            if float(claim["expires_at"]) > time.time():
                return False
        except FileNotFoundError:  # released and deleted since the listing
            continue
        except (ValueError, TypeError, KeyError):  # unreadable: assume a live holder
            return False
    return True


def mark_started(out: str, fingerprint: dict, owner: str, quiet_s: float) -> None:
    """Before this host's first claim: record in the job file that a host starts working under it
    (compare-and-swap), so that no other host re-pins it meanwhile (repinnable); and check that
    nobody re-pinned it to other settings while this host's engine started."""
    url = job_url(out)
    for _ in range(20):
        cur = read(out)
        if cur is None:
            raise FingerprintMismatch(f"{url} disappeared while this host started; rerun to pin the job again")
        body, generation = cur
        check_fingerprint(out, body, fingerprint)
        started = body.get("started")
        if isinstance(started, dict) and isinstance(started.get("at"), (int, float)) \
                and time.time() - started["at"] < quiet_s / 2:
            return  # a recent mark covers this host's first claim too
        new_body = {**body, "started": {"at": time.time(), "by": owner}}
        if storage.replace_if_generation(url, _encode(new_body), generation):
            return
    raise storage.StorageError(f"{url} kept changing under this host; try again")


def verify(pinned: list[FileInfo], found: list[tuple[str, storage.Stat]],
           columns: dict[str, str] | None = None) -> tuple[list[FileInfo], list[tuple[str, storage.Stat]]]:
    """Check the files found against the pin. Returns (the pinned files at the versions found now,
    the files found that are not pinned); CorpusMismatch names the first file gone or changed."""
    by_url = dict(found)
    current = []
    for f in pinned:
        st = by_url.get(f.url)
        if st is None:
            raise CorpusMismatch(f"{f.url} is pinned in the job file but no longer found under DATASET_PATH; "
                                 f"restore it, or use a new OUTPUT_PATH")
        version = storage.input_version(f.url, st)
        if st.size != f.size and f.size >= 0:
            raise CorpusMismatch(f"{f.url} changed since the job pinned it (size {f.size} -> {st.size}); "
                                 f"restore it, or use a new OUTPUT_PATH")
        if version != f.version:
            footer = dataset.read_footer(f.url, st.size, version)
            if not f.digest or footer.digest != f.digest or footer.num_rows != f.num_rows:
                raise CorpusMismatch(
                    f"{f.url} changed since the job pinned it (version {f.version} -> {version}, "
                    f"rows {f.num_rows} -> {footer.num_rows}); restore it, or use a new OUTPUT_PATH")
            log.info("%s has a new version (%s) with the same size and footer as pinned: reading it", f.url, version)
        current.append(FileInfo(f.url, f.stem, f.num_rows, st.size, version, f.digest))
    pinned_urls = {f.url for f in pinned}
    return current, [(u, st) for u, st in found if u not in pinned_urls]


def _adopt(out: str, body: dict, fingerprint: dict, found, columns, chunk_size: int, seed: int, limit: int):
    """A version-1 job file: pin the files found now under the legacy stems."""
    urls = [u for u, _ in found]
    files = dataset.describe(found, dataset.legacy_file_stems(urls), columns)
    stems = {f.stem for f in files}
    strays = sorted({dataset.parse_chunk_name(n)[0] for n in finished_chunk_names(out)} - stems)
    if strays:
        raise CorpusMismatch(
            f"{out} holds chunks of an input file that is not found now (output name {strays[0]!r}): the corpus "
            f"changed since this job started; restore it, or use a new OUTPUT_PATH")
    p, totals = _summary(files, chunk_size, seed, limit)
    fp = dict(body["fingerprint"])
    for k in LATER_KEYS:
        if k not in fp and k in fingerprint:
            fp[k] = fingerprint[k]
    new_body = {**body, **totals, "version": VERSION, "fingerprint": fp,
                "corpus": {"base": "(legacy: the common folder of the files)",
                           "files": [f.pin() for f in sorted(files, key=lambda f: f.url)], "extensions": [],
                           "adopted_at": time.time()}}
    return new_body, p


def pinned_plan(out: str) -> Plan | None:
    """The plan of the job in OUT from its pin alone (no input file is read); None without a pin."""
    cur = read(out)
    if cur is None or "corpus" not in cur[0]:
        return None
    body = cur[0]
    fp = body["fingerprint"]
    files = [FileInfo.from_pin(d) for d in body["corpus"]["files"]]
    return dataset.plan_files(files, fp["chunk_size"], fp.get("seed", 0), fp.get("limit", 0))


def job_plan(out: str, dataset_path: str | None = None) -> Plan:
    """The plan of the job in OUT: from its corpus pin, or (job files of kdgen before the pin)
    from the files under dataset_path with the stems that kdgen used."""
    p = pinned_plan(out)
    if p is not None:
        return p
    fp = read_body(out)["fingerprint"]
    found = dataset.discover(dataset_path or fp["dataset_path"])
    files = dataset.describe(found, dataset.legacy_file_stems([u for u, _ in found]))
    return dataset.plan_files(files, fp["chunk_size"], fp.get("seed", 0), fp.get("limit", 0))

"""`kdgen show OUT`: records of any output (local or gs://) as text for people: the first
records (`--n`), those of one chunk object (`--chunk NAME`) or every sample of one input row
(`--row FILE:ROW`). Each record: where it came from, the prompt, the completion, the finish
reason, token counts and a logprob summary; error rows show their reason (also those only the
`_errors/` index of older outputs holds). See docs/operations.md ("kdgen show").
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap

from kdgen import storage
from kdgen.config import FILE_FORMATS
from kdgen.corpus import dataset
from kdgen.corpus import jobfile
from kdgen.records import chunk_object, naming, schema

MAX_CHARS = 2000  # of one prompt or completion; the rest is counted, not printed


class ShowError(ValueError):
    """Nothing to show for what was asked; the message says why and what exists."""


def chunk_objects(out: str) -> dict[str, str]:
    """Chunk name -> object name (with its suffix), for every chunk object in OUT."""
    found = {}
    for name in storage.list_names(out):
        parsed = naming.parse_object_name(name)
        if parsed:
            found[parsed[0]] = name
    return dict(sorted(found.items()))


def read_chunk(out: str, obj: str) -> tuple[list[dict], list[dict]]:
    """Records and error rows of one chunk object; plus error rows that only the `_errors/`
    index holds (outputs written before error rows moved into the chunk object)."""
    records, errors = chunk_object.read_chunk_object(storage.join(out, obj))
    index_url = naming.errors_index_url(out, obj)
    try:
        index = storage.read_bytes(index_url)
    except FileNotFoundError:
        return records, errors
    known = {row_of(e) for e in errors} | {row_of(r) for r in records if error_of(r)}
    for line in index.splitlines():
        if line.strip():
            try:
                e = json.loads(line)
                row = row_of(e)
            except (ValueError, AttributeError, KeyError, TypeError):
                raise ShowError(f"{index_url}: a line is not an error record: {line[:80]!r}") from None
            if row not in known:
                errors.append(e)
    return records, sorted(errors, key=row_of)


def row_of(r: dict) -> int:
    return schema.row_of(r, -1)


def sample_of(r: dict) -> int:
    return r.get("sample_idx", r.get("metadata", {}).get("sample_idx", 0))


def file_of(r: dict) -> str:
    return r.get("parquet_file") or r.get("metadata", {}).get("parquet_file", "?")


def error_of(r: dict) -> str | None:
    return r.get("error") or r.get("metadata", {}).get("error")


def parse_row(spec: str) -> tuple[str, int]:
    file, sep, row = str(spec).rpartition(":")
    if not sep or not file or not row.strip().isdigit():
        raise ShowError(f"--row must be FILE:ROW (an input file's name and a row index), got {spec!r}")
    return file, int(row)


def stem_matches(stem: str, file: str) -> bool:
    """Does the chunk stem name this input file? FILE may be a basename, a stem or a full URL."""
    f = dataset.file_stems([file], "")[0]
    return stem == f or stem.endswith("__" + f) or f.endswith("__" + stem)


def select(out: str, n: int = 3, chunk: str | None = None, row: str | None = None) -> list[dict]:
    """What to show, in order: per chunk object its URL, the records and error rows to print,
    and how many of each it holds."""
    objects = chunk_objects(out)
    if not objects:
        where = "" if storage.exists(jobfile.job_url(out)) else " (and no _job.json: is it a kdgen output?)"
        raise ShowError(f"{out} holds no chunk objects yet{where}")
    if row is not None:
        file, idx = parse_row(row)
        names = [c for c in objects if stem_matches(dataset.parse_chunk_name(c)[0], file)]
        if not names:
            stems = sorted({dataset.parse_chunk_name(c)[0] for c in objects})
            raise ShowError(f"no chunk object in {out} comes from {file!r}; files with output: "
                            + ", ".join(stems[:5]) + (" ..." if len(stems) > 5 else ""))
        holding = [c for c in names if dataset.parse_chunk_name(c)[1] <= idx < dataset.parse_chunk_name(c)[2]]
        if not holding:
            raise ShowError(f"row {idx} of {file} is in no chunk object of {out} (not done yet, or past the "
                            f"file's end); its chunks there cover rows "
                            + ", ".join("{}-{}".format(*dataset.parse_chunk_name(c)[1:]) for c in names[:5]))
        picked = []
        for c in holding:
            records, errors = read_chunk(out, objects[c])
            picked.append(part(out, objects[c], records, errors, [r for r in records if row_of(r) == idx],
                               [e for e in errors if row_of(e) == idx]))
        return picked
    if chunk is not None:
        name = str(chunk)
        for fmt in FILE_FORMATS:
            name = name.removesuffix("." + fmt)
        name = name.rsplit("/", 1)[-1]
        if name not in objects:
            raise ShowError(f"no chunk object {name!r} in {out}; it has {len(objects)}, e.g. "
                            + ", ".join(list(objects)[:3]))
        records, errors = read_chunk(out, objects[name])
        return [part(out, objects[name], records, errors, records[:n], errors[:n])]
    picked, shown = [], 0
    for obj in objects.values():
        records, errors = read_chunk(out, obj)
        picked.append(part(out, obj, records, errors, records[: n - shown], errors[: n - shown]))
        shown += len(picked[-1]["records"])
        if shown >= n:
            break
    return picked


def part(out: str, obj: str, records: list, errors: list, shown_records: list, shown_errors: list) -> dict:
    return {"url": storage.join(out, obj), "num_records": len(records), "num_errors": len(errors),
            "records": shown_records, "errors": shown_errors}


def clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f" … (+{len(text) - MAX_CHARS} characters)"


def block(text: str | None, width: int) -> list[str]:
    if text is None:
        return ["  (none)"]
    if not text.strip():
        return ["  (empty)"]
    lines = []
    for para in clip(text).splitlines() or [""]:
        lines += textwrap.wrap(para, width - 2, initial_indent="  ", subsequent_indent="  ",
                               replace_whitespace=False, drop_whitespace=True) or [""]
    return lines


def logprob_summary(token_lps: list, top_ids: list | None) -> str:
    values = [x for x in token_lps if x is not None]
    if not values:
        return "logprobs: none"
    k = max((len(t) for t in top_ids or []), default=0)
    mean = sum(values) / len(values)
    worst = min(range(len(token_lps)), key=lambda i: token_lps[i] if token_lps[i] is not None else 0.0)
    top = f"top-{k} at {len(top_ids)} positions; " if k else ""
    return (f"logprobs: {top}sampled tokens mean {mean:.3f} (perplexity {math.exp(-mean):.2f}), "
            f"lowest {token_lps[worst]:.3f} at position {worst}")


def format_record(r: dict, width: int = 100) -> str:
    """A record of any output format (sequence_kd, conversations, score) as a few lines of text."""
    meta = r.get("metadata", {}) if isinstance(r.get("metadata"), dict) else {}
    head = f"{file_of(r).rsplit('/', 1)[-1]} row {row_of(r)} · sample {sample_of(r)}"
    lines = ["── " + head + " " + "─" * max(3, width - len(head) - 4)]
    if "conversations" in r:
        turns = r["conversations"]
        for t in turns[:-1] if not error_of(r) else turns:
            lines.append(f"{t.get('from', '?')}:")
            lines += block(t.get("value"), width)
        if error_of(r):
            lines.append(f"error: {error_of(r)}")
            return "\n".join(lines)
        usage = meta.get("usage", {})
        lines.append(f"completion ({usage.get('completion_tokens', '?')} tokens, prompt "
                     f"{usage.get('prompt_tokens', '?')}; finish_reason {meta.get('finish_reason')}):")
        lines += block(turns[-1].get("value") if turns else None, width)
        if meta.get("token_logprobs") is not None:
            lines.append(logprob_summary(meta["token_logprobs"], meta.get("top_token_ids")))
    elif "generated" in r:
        lines.append(f"prompt ({len(r.get('prompt_token_ids', []))} tokens):")
        lines += block(r.get("prefix"), width)
        lines.append(f"completion ({len(r.get('completion_token_ids', []))} tokens; "
                     f"finish_reason {r.get('finish_reason')}):")
        lines += block(r.get("generated"), width)
        if r.get("token_logprobs") is not None:
            lines.append(logprob_summary(r["token_logprobs"], r.get("top_token_ids")))
        if r.get("reasoning"):
            lines.append("reasoning:")
            lines += block(r["reasoning"], width)
    elif "token_logprobs" in r:  # scoring
        lines.append(f"scored {len(r.get('token_ids', []))} tokens; " + logprob_summary(
            r["token_logprobs"], r.get("top_token_ids")))
        if "completion_logprob" in r:
            lines.append(f"completion tokens {r['completion_start']}-{r['completion_end']}: "
                         f"logprob {r['completion_logprob']:.3f}")
    else:  # a format this version does not know: its fields, compactly
        lines += block(json.dumps(r, ensure_ascii=False), width)
    extra = {k: v for k, v in meta.items() if k in ("latency_s", "attempts")}
    if extra:
        lines.append("metadata: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    return "\n".join(lines)


def format_error(e: dict, width: int = 100) -> str:
    head = f"{file_of(e).rsplit('/', 1)[-1]} row {row_of(e)} · ERROR"
    return "\n".join(["── " + head + " " + "─" * max(3, width - len(head) - 4)] + block(error_of(e), width))


def show(out: str, n: int = 3, chunk: str | None = None, row: str | None = None, stream=None) -> int:
    """Print records (and error rows) of OUT; returns how many records were printed."""
    stream = sys.stdout if stream is None else stream
    if n < 1:
        raise ShowError(f"--n must be >= 1, got {n}")
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    printed = 0
    for p in select(out, n, chunk, row):
        print(f"{p['url']}: {p['num_records']} records, {p['num_errors']} error rows; showing "
              f"{len(p['records'])} and {len(p['errors'])}", file=stream)
        for r in p["records"]:
            print(format_record(r, width), file=stream)
        for e in p["errors"]:
            print(format_error(e, width), file=stream)
        printed += len(p["records"])
    return printed

"""Issue 19 (integrity, engine-free): chunk objects state a content hash that readers verify, the
audit checks every record belongs to its object, names malformed output objects, and
`kdgen audit --repair` moves bad chunk objects aside so that the next run generates them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage
from kdgen.worker import runner
from kdgen.views import status
from kdgen.records import writer
from kdgen.corpus.dataset import Chunk
from kdgen.prompts import input_columns
from tests.conftest import REPO, job_config

FORMATS = ["jsonl", "parquet"]


@pytest.fixture
def corpus(tmp_path) -> str:
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"text": [f"{name} row {i}" for i in range(4)]}), str(d / f"{name}.parquet"))
    return str(d)


def config(corpus: str, out: str, **kw):
    return job_config(**{"model_path": "m", "dataset_path": corpus, "output_path": out, "chunk_size": 4, **kw})


def kd_record(file: str, row: int) -> dict:
    return {"parquet_file": file, "row_idx": row, "prefix": f"row {row}", "generated": "text",
            "prompt_token_ids": [1, 2], "completion_token_ids": [3, 4, 5], "finish_reason": "stop", "sample_idx": 0}


def finished_job(corpus: str, out: str, fmt: str = "jsonl"):
    """A job whose two chunks (a and b, 4 rows each) are committed by kdgen's own writer."""
    c = config(corpus, out, output_file_format=fmt)
    runner.prepare(c, input_columns(c))
    for stem in ("a", "b"):
        file = os.path.join(corpus, f"{stem}.parquet")
        ch = Chunk(file, stem, 0, 4)
        assert writer.commit_chunk(c, ch, [kd_record(file, r) for r in range(3)],
                                   [{"parquet_file": file, "row_idx": 3, "error": "a is empty", "error_kind": "data"}])
    return c


def obj_path(out: str, stem: str, fmt: str = "jsonl") -> str:
    return os.path.join(out, f"{stem}_rows_0000000_0000004.{fmt}")


def run_cli(argv) -> tuple[int, str, str]:
    """`kdgen ARGV` as a user runs it (its own process): (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "kdgen.cli", *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO})
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------- item 12: content hash, membership

@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_objects_state_a_hash_that_plain_readers_pass_over(corpus, tmp_path, fmt):
    out = str(tmp_path / "out")
    finished_job(corpus, out, fmt)
    path = obj_path(out, "a", fmt)
    data = open(path, "rb").read()
    stated, actual = writer.content_hash(data, fmt)
    assert stated == actual and len(stated) == 64
    records, errors = writer.read_chunk_object(path)
    assert [r["row_idx"] for r in records] == [0, 1, 2] and writer.HASH_KEY not in records[0]
    # Plain readers see the object as it is: one row per record line, the hash one extra column.
    import duckdb

    reader = "read_json_auto" if fmt == "jsonl" else "read_parquet"
    assert duckdb.sql(f"select count(*) from {reader}('{path}')").fetchall()[0][0] == 4
    if fmt == "jsonl":
        import datasets

        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == 4 and ds["row_idx"] == [0, 1, 2, 3]
    report = status.audit(out)
    assert report["ok"] and report["chunks_not_verified"] == 0, status.format_audit(report)


@pytest.mark.parametrize("fmt", FORMATS)
def test_audit_finds_a_truncated_or_edited_chunk_object(corpus, tmp_path, fmt):
    """Before: a truncated JSONL copy (whole lines lost) or an edited record passed the audit."""
    out = str(tmp_path / "out")
    finished_job(corpus, out, fmt)
    path = obj_path(out, "a", fmt)
    data = open(path, "rb").read()
    if fmt == "jsonl":  # an edit that still decodes: only the hash sees it
        damaged = data.replace(b'"generated": "text"', b'"generated": "tex!"', 1)
    else:
        damaged = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]  # one flipped byte in a page
    open(path, "wb").write(damaged)
    report = status.audit(out)
    assert not report["ok"]
    assert [b["object"] for b in report["bad_objects"]] == [os.path.basename(path)]
    assert "bad chunk object a_rows_0000000_0000004" in status.format_audit(report)


def test_audit_finds_another_files_chunk_object_under_this_name(corpus, tmp_path):
    """Before: b's chunk object copied over a's (same row range) passed the audit."""
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    with open(obj_path(out, "b"), "rb") as src, open(obj_path(out, "a"), "wb") as dst:
        dst.write(src.read())
    report = status.audit(out)
    assert not report["ok"]
    (bad,) = report["bad_objects"]
    assert bad["object"] == "a_rows_0000000_0000004.jsonl" and "b.parquet row 0" in bad["reason"]


def test_objects_without_a_hash_are_reported_not_failed(corpus, tmp_path):
    """Chunk objects written before hashes: the verdict says how many could not be verified."""
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    path = obj_path(out, "a")
    records, errors = writer.read_chunk_object(path)
    open(path, "wb").write(writer.encode_jsonl(records + errors))
    report = status.audit(out)
    assert report["ok"] and report["chunks_not_verified"] == 1
    assert "1 chunk objects not verified" in status.format_audit(report).splitlines()[0]


# ---------------------------------------------------------------- item 13: audit --repair

@pytest.mark.parametrize("fmt", FORMATS)
def test_audit_repair_moves_a_truncated_object_aside_so_it_is_generated_again(corpus, tmp_path, fmt):
    """Before: a truncated chunk object counted as done forever ("nothing to do")."""
    out = str(tmp_path / "out")
    finished_job(corpus, out, fmt)
    path = obj_path(out, "a", fmt)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    code, stdout, _ = run_cli(["audit", out, "--repair"])
    assert code == 1 and "bad chunk object a_rows_0000000_0000004" in stdout and "repair: moved 1" in stdout
    name = os.path.basename(path)
    assert not os.path.exists(path)
    assert open(os.path.join(out, "_bad", name), "rb").read() == data[: len(data) // 2]
    why = json.load(open(os.path.join(out, "_bad", name + ".why.json")))
    assert why["object"] == name and "unreadable" in why["reason"]
    # The next run's listing no longer counts the chunk as done; the audit now says it is missing.
    assert "a_rows_0000000_0000004" not in writer.finished_chunk_names(out)
    c = config(corpus, out, output_file_format=fmt)
    plan = runner.prepare(c, input_columns(c))
    todo = [ch.name for ch in plan.chunks if ch.name not in writer.finished_chunk_names(out)]
    assert todo == ["a_rows_0000000_0000004"]
    report = status.audit(out)
    assert report["missing_chunks"] == ["a_rows_0000000_0000004"] and not report["bad_objects"]


# ---------------------------------------------------------------- item 9: malformed output objects

def test_malformed_chunk_line_fails_the_audit_naming_the_object(corpus, tmp_path):
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    open(obj_path(out, "a"), "wb").write(b"[1,2]\n")
    code, stdout, err = run_cli(["audit", out])
    assert code == 1 and "Traceback" not in err
    assert "bad chunk object a_rows_0000000_0000004.jsonl" in stdout
    code, stdout, err = run_cli(["show", out, "--chunk", "a_rows_0000000_0000004"])
    assert code == 2 and "a_rows_0000000_0000004.jsonl" in err and "Traceback" not in err


def test_status_shows_what_it_can_and_names_malformed_objects(corpus, tmp_path):
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    os.makedirs(os.path.join(out, "_claims"), exist_ok=True)
    with open(os.path.join(out, "_claims", "x_rows_0000000_0000004.json"), "w") as f:
        json.dump({"owner": "h", "expires_at": "soon", "nonce": "n"}, f)
    os.makedirs(os.path.join(out, "_hosts"), exist_ok=True)
    with open(os.path.join(out, "_hosts", "h.json"), "w") as f:
        json.dump([1, 2], f)
    code, stdout, err = run_cli(["status", out])
    assert code == 0 and "Traceback" not in err, err
    assert "2/2 chunks done" in stdout
    assert "_claims/x_rows_0000000_0000004.json" in stdout and "_hosts/h.json" in stdout
    with open(os.path.join(out, "_job.json"), "w") as f:
        json.dump([1, 2], f)
    code, stdout, err = run_cli(["status", out])
    assert code == 0 and "_job.json: holds a JSON list" in stdout and "2/None chunks done" in stdout, stdout
    code, stdout, err = run_cli(["audit", out])
    assert code == 2 and "_job.json" in err and "Traceback" not in err


# ---------------------------------------------------------------- item 11: a lost _job.json

def test_a_run_over_chunks_without_a_job_file_is_refused_and_adopt_repins_them(corpus, tmp_path):
    """Before: _job.json deleted, a rerun with other settings adopted the old chunks silently and
    rewrote _job.json with its own settings."""
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    os.remove(os.path.join(out, "_job.json"))
    c = config(corpus, out, temperature=0.7, seed=3)
    with pytest.raises(writer.FingerprintMismatch, match=r"holds 2 chunk objects but no _job.json.*kdgen adopt"):
        runner.prepare(c, input_columns(c))
    assert not os.path.exists(os.path.join(out, "_job.json"))
    code, stdout, err = run_cli(["adopt", out, "--model_path", "m", "--dataset_path", corpus, "--chunk_size", "4",
                                 "--max_prefill_length", "32", "--max_target_length", "48"])
    assert code == 0, err
    assert "adopted" in stdout
    job = json.load(open(os.path.join(out, "_job.json")))
    (entry,) = job["adopted"]
    assert entry["chunks"] == 2 and entry["at"] > 0
    report = status.audit(out)
    assert report["ok"] and len(report["adopted"]) == 1
    assert "adopted 1 time(s) by `kdgen adopt`" in status.format_audit(report).splitlines()[0]
    # Adopting again: the job file is there, nothing to adopt.
    code, _, err = run_cli(["adopt", out, "--model_path", "m", "--dataset_path", corpus, "--chunk_size", "4"])
    assert code == 2 and "nothing to adopt" in err and len(err.strip().splitlines()) == 1


def test_adopt_refuses_settings_whose_plan_does_not_hold_the_chunks(corpus, tmp_path):
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    os.remove(os.path.join(out, "_job.json"))
    c = config(corpus, out, chunk_size=2)
    with pytest.raises(writer.FingerprintMismatch, match="not chunks of this plan"):
        runner.prepare(c, input_columns(c), adopt=True)
    assert not os.path.exists(os.path.join(out, "_job.json"))


# ---------------------------------------------------------------- items 15 and 21: export

def test_export_reads_the_plan_pinned_in_the_job_file(corpus, tmp_path):
    """Before: export re-planned from DATASET_PATH: a file added there made it refuse ("chunks are
    not committed yet") while the audit said OK; with the corpus moved it failed."""
    from kdgen.export import shards

    out = str(tmp_path / "out")
    finished_job(corpus, out)
    pq.write_table(pa.table({"text": ["new"] * 4}), os.path.join(corpus, "c.parquet"))
    s = shards.export(out, "parquet", str(tmp_path / "dest"))
    assert (s.shards, s.examples) == (1, 6)
    os.rename(corpus, str(tmp_path / "moved"))
    s = shards.export(out, "parquet", str(tmp_path / "dest2"))
    assert (s.shards, s.examples) == (1, 6)


@pytest.mark.parametrize("bad_name", ["../escaped.parquet", "ABSOLUTE", "sub/x.parquet"])
def test_export_refuses_a_manifest_naming_a_shard_outside_dest(corpus, tmp_path, bad_name):
    """Before: a DEST/.kdgen_manifest.json naming `../escaped.parquet` made export write outside DEST."""
    from kdgen.export import shards

    out = str(tmp_path / "out")
    finished_job(corpus, out)
    dest = tmp_path / "dest"
    shards.export(out, "parquet", str(dest))
    manifest = json.loads((dest / shards.MANIFEST).read_text())
    absolute = str(tmp_path / "abs-escaped.parquet")
    manifest["shards"][0]["name"] = absolute if bad_name == "ABSOLUTE" else bad_name
    (dest / shards.MANIFEST).write_text(json.dumps(manifest))
    for f in dest.iterdir():
        if f.name != shards.MANIFEST:
            f.unlink()
    code, _, err = run_cli(["export", out, "--to", "parquet", "--dest", str(dest)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert shards.MANIFEST in err and "not a plain file name" in err
    assert not os.path.exists(tmp_path / "escaped.parquet") and not os.path.exists(absolute)
    assert sorted(os.listdir(dest)) == [shards.MANIFEST]


# ---------------------------------------------------------------- items 7 and 8: bad bytes in cells and names

def test_a_cell_that_is_not_utf8_becomes_an_error_record_and_the_rest_is_generated(tmp_path, tokenizer):
    """Before: `kdgen: error: 'utf-8' codec can't decode byte 0xff ...`, exit 2, no row named, and
    every rerun failed the same way. The file is a real parquet file whose string column holds
    bytes that are not UTF-8 (parquet does not check)."""
    from kdgen.corpus import dataset
    from kdgen.prompts import PromptBuilder

    texts = pa.array([b"hello world", b"bad \xff\xfe text", b"fine row", b"more words"], pa.binary())
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"text": texts.view(pa.string())}), path)
    c = config(str(tmp_path), str(tmp_path / "out"))
    plan = runner.prepare(c, input_columns(c))  # the footer is fine: planned as usual
    (chunk,) = plan.chunks
    rows = dataset.read_chunk_rows(chunk, list(input_columns(c)))
    builder = PromptBuilder(c, tokenizer, 512)
    prompts = [p for start, t in rows.parts for p in builder.build_table(t, start)]
    assert [p.row_idx for p in prompts] == [0, 1, 2, 3]
    bad = prompts[1]
    assert bad.error == "text is not valid UTF-8 (byte 0xff at position 4: invalid start byte)"
    assert bad.error_kind == "data" and bad.token_ids == []
    assert all(p.error is None and p.token_ids for p in prompts[:1] + prompts[2:])
    e = writer.error_record(chunk, bad)
    assert (e["parquet_file"], e["row_idx"]) == (path, 1)


def test_an_input_file_whose_name_is_not_utf8_is_refused_at_planning(tmp_path):
    """Before: the chunk was generated, then its commit failed (`surrogates not allowed`), on every rerun."""
    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), str(d / "good.parquet"))
    with open(os.path.join(os.fsencode(str(d)), b"bad\xff.parquet"), "wb") as f:
        pq.write_table(pa.table({"text": ["a", "b"]}), f)
    out = str(tmp_path / "out")
    c = config(str(d), out)
    with pytest.raises(ValueError, match=r"bad\\xff.parquet'.*not valid UTF-8"):
        runner.prepare(c, input_columns(c))
    assert not os.path.exists(out)
    code, _, err = run_cli(["plan", "--dataset_path", str(d), "--chunk_size", "4"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad\\xff.parquet" in err, err


# ---------------------------------------------------------------- item 14: partial segments

def test_partial_segments_that_do_not_match_their_checksum_are_ignored(tmp_path, caplog):
    """Before: a segment was trusted verbatim: edited text went into the chunk, and a hand-made
    header with a death event quarantined a row."""
    from kdgen.fleet import partial
    from kdgen.prompts import Prompt

    out, fp = str(tmp_path), "f" * 16
    chunk = Chunk("/data/shard.parquet", "shard", 10, 14)
    prompts = [Prompt(row_idx=r, token_ids=[r, 7], max_tokens=5) for r in range(10, 14)]
    seg = partial.Segments(out, fp, chunk.name, "host:0")
    url, head = seg.next(attempt=1)
    rows = [partial.Row(r, partial.prompt_hash(prompts[r - 10]), [{"row_idx": r, "generated": f"text {r}"}], None, 1)
            for r in (10, 11)]
    assert partial.write_segment(url, head, rows, chunk.name)
    assert sorted(partial.load(out, fp, chunk, prompts).rows) == [10, 11]  # the genuine segment is used
    storage.write_bytes(url, storage.read_bytes(url).replace(b"text 11", b"FORGED!"))
    with caplog.at_level("WARNING"):
        cached = partial.load(out, fp, chunk, prompts)
    assert cached.rows == {} and cached.segments == 0
    assert "does not match the checksum" not in caplog.text and "do not match the checksum" in caplog.text
    # A hand-made header (no checksum) claiming the engine died on row 12 alone.
    forged = {"kdgen_partial": 1, "chunk": chunk.name, "fingerprint": fp, "take": "x", "seq": 0, "owner": "?",
              "attempt": 1, "rows": 0,
              "events": [{"died": [12], "alone": True, "intent": None, "reason": "forged"}] * 2}
    storage.write_bytes(storage.join(partial.chunk_dir(out, chunk.name), f"{fp}-x-00000.jsonl"),
                        json.dumps(forged).encode() + b"\n")
    assert partial.load(out, fp, chunk, prompts).history.quarantine() == {}
    # An event of a shape kdgen never writes is refused even under a matching checksum.
    seg2 = partial.Segments(out, fp, chunk.name, "host:1")
    seg2.pending_events = [{"died": "12", "alone": True}]
    url2, head2 = seg2.next(attempt=1)
    assert partial.write_segment(url2, head2, [], chunk.name)
    assert partial.load(out, fp, chunk, prompts).segments == 0


def test_a_malformed_corpus_pin_or_errors_index_is_named(corpus, tmp_path):
    out = str(tmp_path / "out")
    finished_job(corpus, out)
    with open(os.path.join(out, "_errors", "a_rows_0000000_0000004.jsonl"), "w") as f:
        f.write("[1, 2]\n")
    code, _, err = run_cli(["show", out, "--chunk", "a_rows_0000000_0000004"])
    assert code == 2 and "_errors/a_rows_0000000_0000004.jsonl" in err and "Traceback" not in err, err
    job = json.load(open(os.path.join(out, "_job.json")))
    job["corpus"]["files"][0] = {"url": "x"}
    json.dump(job, open(os.path.join(out, "_job.json"), "w"))
    code, _, err = run_cli(["audit", out])
    assert code == 2 and "_job.json is unreadable" in err and "Traceback" not in err, err


def test_a_jsonl_input_that_is_not_utf8_is_refused_naming_its_line(tmp_path):
    from kdgen.corpus import dataset

    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"prompt": "hi"}\n{"prompt": "bad \xff"}\n')
    with pytest.raises(dataset.DatasetError, match=r"chat.jsonl: line 2 is not valid UTF-8 \(byte 0xff\)"):
        dataset.read_footer(str(path))


# ---------------------------------------------------------------- the real job (one engine test)

def test_real_job_records_a_bad_utf8_row_and_regenerates_a_repaired_chunk(engine, tiny_model, tmp_path):
    """End to end on the real engine: a cell that is not UTF-8 is one error record while its
    neighbours are generated; a truncated chunk object moved aside by `audit --repair` is
    generated again by the rerun, after which the audit is OK."""
    d = tmp_path / "corpus"
    d.mkdir()
    texts = [f"the quick brown fox {i} jumps over the lazy dog".encode() for i in range(8)]
    texts[5] = b"the quick \xff brown fox"
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary()).view(pa.string())}), str(d / "f.parquet"))
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=str(d), output_path=out, chunk_size=4)
    s = runner.run(c, engine=engine)
    assert s.chunks_committed == 2 and s.error_rows == 1
    report = status.audit(out)
    assert report["ok"] and report["rows_ok"] == 7 and report["chunks_not_verified"] == 0
    (failed,) = report["failed_rows"]
    assert failed["row_idx"] == 5 and failed["error"].startswith("text is not valid UTF-8 (byte 0xff")
    path = os.path.join(out, "f_rows_0000004_0000008.jsonl")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 40])
    assert runner.run(c, engine=engine).chunks_committed == 0  # a run does not read every object
    report = status.audit(out)
    assert not report["ok"] and [b["object"] for b in report["bad_objects"]] == [os.path.basename(path)]
    assert status.repair(out, report) == [os.path.basename(path)]
    assert runner.run(c, engine=engine).chunks_committed == 1
    report = status.audit(out)
    assert report["ok"] and report["rows_ok"] == 7, status.format_audit(report)

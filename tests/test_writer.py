"""Chunk objects without an engine: one create holds records and error rows, both file formats,
read back through chunk_object.read_chunk_object; the audit trusts only chunk objects."""

from __future__ import annotations

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage
from kdgen.records import parquet_codec
from kdgen.corpus import jobfile
from kdgen.worker import runner
from kdgen.views import audit
from kdgen.records import chunk_object, naming, schema
from kdgen.corpus.dataset import Chunk
from kdgen.prompts import input_columns
from kdgen.corpus.jobfile import FingerprintMismatch
from tests.conftest import job_config

FORMATS = ["jsonl", "parquet"]


@pytest.fixture
def corpus(tmp_path) -> str:
    d = tmp_path / "corpus"
    d.mkdir()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(4)]}), str(d / "f.parquet"))
    return str(d)


def config(corpus: str, out: str, **kw):
    return job_config(model_path="m", dataset_path=corpus, output_path=out, chunk_size=4, **kw)


def kd_record(file: str, row: int, **extra) -> dict:
    r = {"parquet_file": file, "row_idx": row, "prefix": f"row {row}", "generated": "text",
         "prompt_token_ids": [1, 2], "completion_token_ids": [3, 4, 5], "finish_reason": "stop", "sample_idx": 0}
    r.update(extra)
    return r


@pytest.mark.parametrize("fmt", FORMATS)
def test_losing_finisher_cannot_change_a_chunks_errors(corpus, tmp_path, fmt):
    """Issue 9 item 3: two hosts finish the same chunk, each with a different failed row (a flaky
    row refused by an endpoint, say). Before, both wrote _errors/<chunk> before racing to create
    the chunk object, so the loser's errors replaced the winner's: the audit then saw a gap at the
    winner's failed row (and an error for a row that has its record), unrepairably."""
    out = str(tmp_path / "out")
    c = config(corpus, out, output_file_format=fmt)
    runner.prepare(c, input_columns(c))
    file = os.path.join(corpus, "f.parquet")
    chunk = Chunk(file, "f", 0, 4)
    a_records = [kd_record(file, r) for r in (0, 1, 2)]
    a_errors = [{"parquet_file": file, "row_idx": 3, "error": "HTTP 400: row 3 too long"}]
    b_records = [kd_record(file, r) for r in (0, 1, 3)]
    b_errors = [{"parquet_file": file, "row_idx": 2, "error": "HTTP 400: row 2 refused"}]
    assert chunk_object.commit_chunk(c, chunk, a_records, a_errors) is True  # A's create wins
    assert chunk_object.commit_chunk(c, chunk, b_records, b_errors) is False  # B finished it too, later
    report = audit.audit(out)
    assert report["ok"], audit.format_audit(report)
    assert report["rows_ok"] == 3 and [f["row_idx"] for f in report["failed_rows"]] == [3]
    # The human index is the winner's, and the audit does not depend on it.
    index = [json.loads(x) for x in storage.read_bytes(naming.errors_url(out, chunk)).splitlines()]
    assert index == a_errors
    os.remove(naming.errors_url(out, chunk))
    assert audit.audit(out)["failed_rows"][0]["row_idx"] == 3


def test_legacy_output_still_audits_from_errors_dir(corpus, tmp_path):
    """Outputs written before chunk objects held their errors (no "layout" in _job.json)."""
    out = str(tmp_path / "out")
    c = config(corpus, out)
    runner.prepare(c, input_columns(c))
    job_url = storage.join(out, jobfile.JOB_FILE)
    job = json.loads(storage.read_bytes(job_url))
    del job["layout"]
    storage.write_bytes(job_url, json.dumps(job).encode())
    file = os.path.join(corpus, "f.parquet")
    chunk = Chunk(file, "f", 0, 4)
    storage.write_bytes(naming.errors_url(out, chunk),
                        chunk_object.encode_jsonl([{"parquet_file": file, "row_idx": 1, "error": "text is null"}]))
    storage.write_bytes(naming.output_url(out, chunk),
                        chunk_object.encode_jsonl([kd_record(file, r) for r in (0, 2, 3)]))
    report = audit.audit(out)
    assert report["ok"] and report["rows_ok"] == 3 and report["failed_rows"][0]["error"] == "text is null"
    # The same output under the new layout: the _errors/ index is not trusted, row 1 is a gap.
    job["layout"] = chunk_object.job_layout(c)
    storage.write_bytes(job_url, json.dumps(job).encode())
    report = audit.audit(out)
    assert not report["ok"] and report["gaps"][0]["row_idx"] == 1


def test_a_mix_of_file_formats_is_refused(corpus, tmp_path):
    out = str(tmp_path / "out")
    c = config(corpus, out)
    runner.prepare(c, input_columns(c))
    jobfile.mark_started(out, c.fingerprint(), "host-a", 30.0)  # a job that never started may be re-pinned
    with pytest.raises(FingerprintMismatch, match="output_file_format: None -> 'parquet'"):
        runner.prepare(config(corpus, out, output_file_format="parquet"), input_columns(c))
    assert "output_file_format" not in c.fingerprint() and "logprobs_mode" not in c.fingerprint()
    assert config(corpus, out, logprobs_mode="processed").fingerprint()["logprobs_mode"] == "processed"


def sample_records(file: str) -> tuple[list[dict], list[dict]]:
    """Every kind of record kdgen writes, with the awkward values (None, -inf, empty lists)."""
    lp = {"token_logprobs": [-0.5, -1.25, -float("inf")], "top_token_ids": [[3, 9], [4, 8], [5, 7]],
          "top_logprobs": [[-0.5, -2.0], [-1.25, -1.5], [-0.1, -float("inf")]]}
    sampling = {"logprobs_mode": "raw", "temperature": 0.7, "top_p": 1.0, "top_k": 0, "logprobs": 2}
    kd = [kd_record(file, 0, **lp, sampling=sampling, reasoning="because", metadata={"latency_s": 0.5}),
          kd_record(file, 0, sample_idx=1, finish_reason=None)]
    score = {"parquet_file": file, "row_idx": 2, "token_ids": [1, 5, 6], "token_logprobs": [None, -2.5, -3.0],
             "top_token_ids": [[], [5, 6], [6, 5]], "top_logprobs": [[], [-2.5, -3.0], [-3.0, -4.0]],
             "segment_starts": [0], "next_top_token_ids": [[7, 8]], "next_top_logprobs": [[-0.25, -3.5]]}
    conv = {"id": "f-3", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
            "metadata": {"parquet_file": file, "idx": 3, "sample_idx": 0, "finish_reason": "length",
                         "usage": {"prompt_tokens": 2, "completion_tokens": 3}, **lp, "sampling": sampling}}
    conv_err = {"id": "f-1", "conversations": [{"from": "human", "value": ""}],
                "metadata": {"parquet_file": file, "idx": 1, "error": "prompt is empty"}}
    errors = [{"parquet_file": file, "row_idx": 1, "error": "prompt is empty"}]
    return kd + [score, conv, conv_err], errors


def close(a, b) -> bool:
    """Equal, with floats compared at float16 precision."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isinf(a) and a == b) or abs(a - b) <= 1e-3 * max(1.0, abs(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_every_record_kind(corpus, tmp_path, fmt):
    out = str(tmp_path / "out")
    c = config(corpus, out, output_file_format=fmt)
    file = os.path.join(corpus, "f.parquet")
    records, errors = sample_records(file)
    chunk = Chunk(file, "f", 0, 4)
    assert chunk_object.commit_chunk(c, chunk, records, errors)
    url = naming.output_url(out, chunk, fmt)
    got, got_errors = chunk_object.read_chunk_object(url)
    want = [r for r in records if "error" not in r.get("metadata", {})]
    assert sorted(map(schema.row_key, got)) == sorted(map(schema.row_key, want))
    by_key = {json.dumps(schema.row_key(r)): r for r in got}
    for r in want:
        assert close(by_key[json.dumps(schema.row_key(r))], r), (r, by_key[json.dumps(schema.row_key(r))])
    assert got_errors == errors
    if fmt == "parquet":
        file_schema = pq.read_schema(url)
        assert file_schema.field("completion_token_ids").type == pa.list_(pa.int32())
        assert file_schema.field("top_token_ids").type == pa.list_(pa.list_(pa.int32()))
        assert file_schema.field("top_logprobs").type == pa.list_(pa.list_(pa.float16()))
        assert file_schema.field("row_idx").type == pa.int64() and file_schema.field("error").type == pa.string()
        assert parquet_codec.file_metadata(storage.read_bytes(url))["sampling"]["logprobs_mode"] == "raw"
    else:  # the error row of a sequence_kd chunk is one inline line, conversations keep theirs
        lines = [json.loads(x) for x in storage.read_bytes(url).splitlines()]
        assert sum("error" in x for x in lines) == 0 and len(lines) == len(records)


def test_unreadable_chunk_object_names_the_object(tmp_path):
    bad = tmp_path / "f_rows_0000000_0000004.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="f_rows_0000000_0000004.parquet: unreadable chunk object"):
        chunk_object.read_chunk_object(str(bad))


def test_builders_write_the_fields_of_the_schema_in_its_order():
    # The records a row becomes hold only fields of kdgen.records.schema, in the schema's order,
    # with every option on (logprobs, prompt top-k, reasoning, endpoint metadata).
    from types import SimpleNamespace

    from kdgen.records import builders

    chunk = Chunk("/d/f.parquet", "f", 0, 4)
    prompt = SimpleNamespace(row_idx=2, token_ids=[1, 2], prefix="hi", error=None, error_kind="data",
                             messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    sample = SimpleNamespace(index=0, token_ids=[3], text="yo", finish_reason="stop", token_logprobs=[-0.5],
                             top_token_ids=[[3, 4]], top_logprobs=[[-0.5, -1.0]], reasoning="because")
    finished = SimpleNamespace(samples=[sample], metadata={"latency_s": 0.5})
    prompt_lps = {k: [None, [-1.0]] for k in schema.PROMPT_LOGPROB_KEYS}
    sampling = {"logprobs": 2}

    def in_schema_order(keys, fields, ordered=True):
        names = [f.name for f in fields]
        assert set(keys) <= set(names), set(keys) - set(names)
        assert not ordered or list(keys) == sorted(keys, key=names.index)

    (kd,) = builders.sequence_kd_records(chunk, prompt, finished, sampling, prompt_lps)
    in_schema_order(kd, schema.SEQUENCE_KD)
    assert list(kd) == schema.columns("sequence_kd", 2, True)  # every field: all options are on
    (conv,) = builders.conversations_records(chunk, prompt, finished, sampling, prompt_lps)
    in_schema_order(conv, schema.CONVERSATIONS)
    meta_fields = [f for f in schema.CONVERSATIONS if f.in_metadata]
    # (metadata keeps the builder's key order; the schema's is the parquet columns')
    in_schema_order([k for k in conv["metadata"] if k not in finished.metadata], meta_fields, ordered=False)
    assert [t["from"] for t in conv["conversations"]] == ["system", "human", "gpt"]
    assert schema.row_key(conv) == schema.row_key(kd) == (2, 0)
    failed = SimpleNamespace(**{**vars(prompt), "error": "too long"})
    in_schema_order(builders.error_record(chunk, failed), schema.ERROR)
    (conv_err,) = builders.conversations_records(chunk, failed, None)
    in_schema_order(conv_err["metadata"], meta_fields, ordered=False)


def numpy_topk(n: int, k: int, seed: int) -> dict:
    """Top-k as the lean vLLM path hands them over: float32 / int32 views of [n, k + 1] arrays
    (column 0 the sampled token), with float16's awkward values among them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lps = -rng.exponential(3.0, (n, k + 1)).astype(np.float32)
    odd = np.array([-np.inf, -0.0, -2.0 ** -24, -3 * 2.0 ** -26, -6.1e-5, -65519.99, -65520.0, -1e30], np.float32)
    lps.flat[: min(odd.size, lps.size)] = odd[: lps.size]
    ids = rng.integers(0, 128256, (n, k + 1)).astype(np.int32)
    return {"token_logprobs": lps[:, 0], "top_token_ids": ids[:, 1:], "top_logprobs": lps[:, 1:]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_topk_gives_the_bytes_of_the_lists_it_holds(corpus, tmp_path, fmt):
    """Records carrying the lean path's numpy top-k (kdgen.engines.base.Sample) encode to the same
    chunk object, and partial segment, as the same records with the arrays' tolist()."""
    from kdgen.fleet import partial

    c = config(corpus, str(tmp_path / "out"), output_file_format=fmt)
    file = os.path.join(corpus, "f.parquet")
    conv_err = sample_records(file)[0][-1]
    kd, conv = [], []
    for row, (n, k) in enumerate([(67, 20), (0, 20), (3, 20), (1, 20), (9, 5)]):  # (0, k): no position
        lp = numpy_topk(n, k, seed=row)
        kd.append(kd_record(file, row, **lp))
        conv.append({"id": f"f-{row}", "conversations": [], "metadata": {"parquet_file": file, "idx": row, **lp}})

    def as_lists(r: dict) -> dict:
        return json.loads(chunk_object.encode_jsonl([r]))

    mixed = [kd[0], as_lists(kd[2])]  # fresh rows beside rows reused from OUT/_partial
    for recs in (kd, conv + [conv_err], mixed):
        lists = [as_lists(r) for r in recs]
        assert not any(type(v).__module__ == "numpy" for r in lists for v in r.values())
        assert chunk_object.encode_chunk(c, recs, []) == chunk_object.encode_chunk(c, lists, [])
    if fmt == "parquet":  # the values too, not only equal bytes: as Arrow rounds Python floats
        got = parquet_codec.decode_parquet(chunk_object.encode_chunk(c, kd, []))
        want = pa.array([kd[0]["top_logprobs"].tolist()], parquet_codec.TYPES["top_logprobs"]).to_pylist()[0]
        assert got[0]["top_logprobs"] == want and got[1]["top_token_ids"] == []
    for name, recs in (("arrays", kd + conv), ("lists", [as_lists(r) for r in kd + conv])):
        partial.write_segment(str(tmp_path / name), {"kdgen_partial": 1}, [partial.Row(0, "h", recs)], "f")
    assert (tmp_path / "arrays").read_bytes() == (tmp_path / "lists").read_bytes()


def test_a_sample_gives_its_numpy_topk_as_lists():
    import numpy as np

    from kdgen.engines.base import Sample

    lp = numpy_topk(4, 3, seed=7)
    s = Sample(0, [1, 2, 3, 4], "t", "length", **lp)
    plain = s.lists()
    assert plain.top_token_ids == lp["top_token_ids"].tolist() and type(plain.token_logprobs[0]) is float
    assert plain == Sample(0, [1, 2, 3, 4], "t", "length", *(lp[k].tolist() for k in lp))
    assert plain.lists() is plain and isinstance(s.top_logprobs, np.ndarray)  # s itself is left as it was

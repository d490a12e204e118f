"""`kdgen export`: committed chunk objects -> MaxText offline-distillation ArrayRecords (read back the
way MaxText's reader reads them), role/content messages and compacted parquet (read back with
`datasets`), resumable and idempotent; a job with a missing chunk is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen import storage, tiny
from kdgen.export import shards
from kdgen.worker import runner
from kdgen.export import tfexample
from kdgen.records import writer
from tests.conftest import PYTHON, job_config
from tests.test_job import read_records

K = 4


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("export-texts")
    rng = random.Random(3)
    rows = [tiny.paragraph(rng, rng.randint(1, 5)) for _ in range(16)]
    rows[4] = None  # a failed row: not exported
    pq.write_table(pa.table({"text": rows}), d / "t.parquet")
    return str(d)


@pytest.fixture(scope="module", params=["jsonl", "parquet"])
def scored(request, engine, tiny_model, texts, tmp_path_factory) -> str:
    """A `kdgen score --logprobs 4` job, texts cut into segments of 24 tokens."""
    out = str(tmp_path_factory.mktemp(f"scored-{request.param}") / "out")
    c = job_config(model_path=tiny_model, dataset_path=texts, output_path=out, task="score", logprobs=K,
                   add_bos=True, chunk_size=6, max_prefill_length=8, max_target_length=24,
                   output_file_format=request.param)
    s = runner.run(c, engine=engine)
    assert s.rows == 15 and s.error_rows == 1
    return out


def parse_features(element: bytes, data_columns=("inputs", "top_k_logits", "top_k_indices")) -> dict:
    """MaxText's input_pipeline_utils.ParseFeatures.map, step by step: proto parse, dtype by the
    feature's kind (float_list -> float32, int64_list -> int32), top-k reshaped to [len(inputs), -1]."""
    example = tfexample.Example()
    example.ParseFromString(element)
    features = example.features.feature
    missing = [c for c in data_columns if c not in features]
    assert not missing, f"Column {missing} not found in dataset"
    parsed = {}
    for col in data_columns:
        f = features[col]
        if len(f.float_list.value) > 0:
            parsed[col] = np.array(f.float_list.value, dtype=np.float32)
        elif len(f.int64_list.value) > 0:
            parsed[col] = np.array(f.int64_list.value, dtype=np.int32)
        elif len(f.bytes_list.value) > 0:
            parsed[col] = np.array(f.bytes_list.value, dtype=object)
        else:
            parsed[col] = np.array([])
    seq_len = len(parsed.get("inputs", []))
    if seq_len > 0:
        parsed["top_k_logits"] = parsed["top_k_logits"].reshape(seq_len, -1)
        parsed["top_k_indices"] = parsed["top_k_indices"].reshape(seq_len, -1)
    return parsed


def read_maxtext(dest: str) -> list[dict]:
    """Records as MaxText's offline pipeline gets them: grain.ArrayRecordDataSource over the files
    `offline_data_dir=DEST/*.array_record` globs, then ParseFeatures."""
    import glob

    import grain.python as grain

    files = sorted(glob.glob(os.path.join(dest, "*.array_record")))
    source = grain.ArrayRecordDataSource(files)
    return [parse_features(source[i]) for i in range(len(source))]


def test_maxtext_offline_round_trip(scored, tmp_path, hf_logprobs):
    dest = str(tmp_path / "maxtext")
    s = shards.export(scored, "maxtext-offline", dest, shard_mb=0.004)
    assert s.shards >= 2 and s.written == s.shards
    names = sorted(os.listdir(dest))
    assert names[0] == ".kdgen_manifest.json" and names[1] == "teacher_top_k_part_00000_host_000.array_record"
    got = read_maxtext(dest)
    records = sorted(read_records(scored), key=writer.row_key)
    parquet = any(n.endswith(".parquet") for n in os.listdir(scored))
    want = []
    for r in records:
        starts = r["segment_starts"]
        for j, (s0, e) in enumerate(zip(starts, starts[1:] + [len(r["token_ids"])])):
            want.append((r["token_ids"][s0:e], r["top_token_ids"][s0 + 1:e] + [r["next_top_token_ids"][j]],
                         r["top_logprobs"][s0 + 1:e] + [r["next_top_logprobs"][j]]))
    assert len(got) == len(want) == s.examples and any(len(w[0]) == 24 for w in want)
    for g, (ids, top_ids, top_lps) in zip(got, want):
        assert g["inputs"].tolist() == ids and g["top_k_indices"].shape == (len(ids), K)
        assert g["top_k_indices"].tolist() == top_ids
        np.testing.assert_allclose(g["top_k_logits"], np.array(top_lps, dtype=np.float32), rtol=0, atol=1e-6)
        # MaxText's convention: position t holds the teacher's top-k for the token AFTER t (the
        # last position: the distribution after the segment), on the segment alone.
        ref = hf_logprobs(ids)
        tol = 1e-3 + (2 ** -10 * 20 if parquet else 0)
        for t in range(len(ids)):
            assert np.abs(g["top_k_logits"][t] - ref[t].topk(K).values.numpy()).max() < tol
    # MaxText's next steps (offline: Rekey inputs/targets <- inputs, keep the rest; grain's first-fit
    # packer at max_target_length) keep every segment whole with its top-k rows beside its tokens.
    import grain.experimental as ge
    import grain.python as grain

    rekeyed = [{**g, "targets": g["inputs"]} for g in got]
    packed = ge.FirstFitPackIterDataset(grain.MapDataset.source(rekeyed).to_iter_dataset(),
                                        length_struct={c: 24 for c in rekeyed[0]}, num_packing_bins=2)
    segments = []
    for p in packed:
        assert p["top_k_logits"].shape == (24, K) and p["inputs_segment_ids"].shape == (24,)
        for seg in set(p["inputs_segment_ids"].tolist()) - {0}:
            m = p["inputs_segment_ids"] == seg
            segments.append((p["inputs"][m].tolist(), p["top_k_indices"][m].tolist()))
    assert sorted(segments) == sorted((g["inputs"].tolist(), g["top_k_indices"].tolist()) for g in got)
    # A rerun finds every shard there and writes nothing.
    before = {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in os.listdir(dest)}
    again = shards.export(scored, "maxtext-offline", dest, shard_mb=0.004)
    assert again.written == 0 and again.skipped == s.shards
    assert {n: os.stat(os.path.join(dest, n)).st_mtime_ns for n in os.listdir(dest)} == before


def test_interrupted_export_resumes_and_manifest_holds_row_ranges(scored, tmp_path):
    dest = str(tmp_path / "pq")
    first = shards.export(scored, "parquet", dest, shard_mb=0.004)
    manifest = json.loads(open(os.path.join(dest, shards.MANIFEST)).read())
    ranges = [(c["start"], c["end"]) for sh in manifest["shards"] for c in sh["chunks"]]
    assert sorted(ranges) == [(0, 6), (6, 12), (12, 16)] and manifest["missing_chunks"] == 0
    assert all(c["parquet_file"].endswith("t.parquet") for sh in manifest["shards"] for c in sh["chunks"])
    os.remove(os.path.join(dest, manifest["shards"][-1]["name"]))  # as if killed before the last shard
    second = shards.export(scored, "parquet", dest, shard_mb=0.004)
    assert (second.written, second.skipped) == (1, first.shards - 1)
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=dest, split="train")
    assert len(ds) == 15 and sorted(ds["row_idx"]) == [i for i in range(16) if i != 4]
    with pytest.raises(shards.ExportError, match="holds an export of other chunks or settings"):
        shards.export(scored, "maxtext-offline", dest)  # DEST is planned for --to parquet
    with pytest.raises(shards.ExportError, match="needs generated completions"):
        shards.export(scored, "messages", str(tmp_path / "m"))


@pytest.fixture(scope="module")
def generated(engine, tiny_model, tmp_path_factory) -> tuple[str, str]:
    d = str(tmp_path_factory.mktemp("export-gen"))
    tiny.make_corpus(os.path.join(d, "corpus"), num_files=2, rows_per_file=10, seed=4)
    out = os.path.join(d, "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=os.path.join(d, "corpus"), output_path=out,
                          chunk_size=5, max_chunks=3), engine=engine)  # 3 of 4 chunks
    return out, os.path.join(d, "corpus")


def test_missing_chunk_is_refused_then_allowed_partial(generated, tmp_path, tokenizer):
    """A prefix-mode (sequence KD) job exports plain text, not a chat: `prompt` (the prefix) +
    `completion` (the generated tokens' text as it continues the prefix) = `text`."""
    out, corpus = generated
    dest = str(tmp_path / "txt")
    r = subprocess.run([PYTHON, "-m", "kdgen.cli", "export", out, "--to", "text", "--dest", dest],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdgen: error:") and "1 of 4 chunks (5 of 20 rows) are not committed" in last
    assert "--allow_partial" in last and not os.path.exists(dest)
    with pytest.raises(shards.ExportError, match="prefix-mode job continues raw text.*--to text"):
        shards.export(out, "messages", str(tmp_path / "msg"), allow_partial=True)
    s = shards.export(out, "text", dest, allow_partial=True)
    assert s.examples == 15
    import datasets

    ds = datasets.load_dataset("json", data_dir=dest, split="train")
    assert len(ds) == 15 and set(ds.column_names) == {"text", "prompt", "completion", "parquet_file", "row_idx",
                                                      "sample_idx"}
    by_row = {(os.path.basename(r["parquet_file"]), r["row_idx"]): r for r in read_records(out)}
    for row in ds:
        rec = by_row[(os.path.basename(row["parquet_file"]), row["row_idx"])]
        assert row["prompt"] == rec["prefix"] and row["completion"].strip() == rec["generated"]
        assert row["text"] == row["prompt"] + row["completion"]
        whole = tokenizer.decode(rec["prompt_token_ids"] + rec["completion_token_ids"], skip_special_tokens=True)
        # the same but for an incomplete UTF-8 character at the end, which vLLM's decoding leaves out
        assert whole.startswith(row["text"]) and set(whole[len(row["text"]):]) <= {"\ufffd"}
    from trl.data_utils import is_conversational

    assert not is_conversational({"prompt": ds[0]["prompt"], "completion": ds[0]["completion"]})
    assert json.loads(open(os.path.join(dest, shards.MANIFEST)).read())["missing_chunks"] == 1


def test_text_parquet_to_gcs(generated, gcs_server, tmp_path):
    out, _ = generated
    dest = gcs_server.url("export", "text")
    s = shards.export(out, "text", dest, allow_partial=True, file_format="parquet")
    names = storage.list_names(dest)
    assert names == [shards.MANIFEST] + [f"text-{i:05d}.parquet" for i in range(s.shards)]
    local = tmp_path / "copy"
    local.mkdir()
    for n in names[1:]:
        (local / n).write_bytes(storage.read_bytes(storage.join(dest, n)))
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(local), split="train")
    assert len(ds) == 15 and ds[0]["text"] == ds[0]["prompt"] + ds[0]["completion"]
    assert shards.export(out, "text", dest, allow_partial=True, file_format="parquet").written == 0


def test_parquet_export_of_a_gcs_job_without_engine(gcs_server, tmp_path):
    """Source OUT on gs:// (listing with sizes, reads), chunk objects made by the writer directly."""
    from kdgen.corpus.dataset import Chunk
    from kdgen.prompts import input_columns

    local = tmp_path / "c"
    local.mkdir()
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(6)]}), str(local / "f.parquet"))
    data, out = gcs_server.url("export-src", "corpus"), gcs_server.url("export-src", "out")
    storage.write_bytes(storage.join(data, "f.parquet"), (local / "f.parquet").read_bytes())
    c = job_config(model_path="m", dataset_path=data, output_path=out, chunk_size=3, output_file_format="parquet")
    runner.prepare(c, input_columns(c))
    file = storage.join(data, "f.parquet")
    for start in (0, 3):
        recs = [{"parquet_file": file, "row_idx": r, "prefix": f"row {r}", "generated": "x", "prompt_token_ids": [1],
                 "completion_token_ids": [2], "finish_reason": "stop", "sample_idx": 0} for r in range(start, start + 3)]
        errs = [recs.pop(1) and {"parquet_file": file, "row_idx": start + 1, "error": "text is empty"}]
        assert writer.commit_chunk(c, Chunk(file, "f", start, start + 3), recs, errs)
    dest = str(tmp_path / "dest")
    s = shards.export(out, "parquet", dest)
    assert (s.shards, s.examples) == (1, 4)
    rows = pq.read_table(os.path.join(dest, "records-00000.parquet")).to_pylist()
    assert sorted(r["row_idx"] for r in rows) == [0, 2, 3, 5]
    assert pq.read_schema(os.path.join(dest, "records-00000.parquet")).field("prompt_token_ids").type == \
        pa.list_(pa.int32())


def test_tf_example_bytes_and_parse():
    """kdgen.export.tfexample writes through protobuf (a message built from tensorflow's example.proto /
    feature.proto): the same bytes the hand-written varint encoder gave (features in the order
    given), parsed equal by the real map-based message."""

    feats = {"inputs": np.array([5, 300], np.int64), "top_k_logits": np.array([-0.5, -1.25], np.float32),
             "sequence_hash": [-3]}
    data = tfexample.example(feats)
    assert data.hex() == ("0a520a110a06696e7075747312071a050a0305ac020a1c0a0c746f705f6b5f6c6f67697473120c120a0a08"
                          "000000bf0000a0bf0a1f0a0d73657175656e63655f68617368120e1a0c0a0afdffffffffffffffff01")
    ex = tfexample.Example()
    ex.ParseFromString(data)
    f = ex.features.feature
    assert list(f["inputs"].int64_list.value) == [5, 300] and list(f["sequence_hash"].int64_list.value) == [-3]
    assert list(f["top_k_logits"].float_list.value) == [-0.5, -1.25]


# ---------------------------------------------------------------- one pass: generation with prompt top-k

@pytest.fixture(scope="module")
def gen_topk(engine, tiny_model, texts, tmp_path_factory) -> str:
    """A greedy generation job with --logprobs 4 --prompt_logprobs: top-k at every prompt and
    completion position (parquet chunk objects: the typed prompt_* columns)."""
    out = str(tmp_path_factory.mktemp("gen-topk") / "out")
    c = job_config(model_path=tiny_model, dataset_path=texts, output_path=out, logprobs=K, prompt_logprobs=True,
                   add_bos=True, chunk_size=6, max_prefill_length=12, max_target_length=36,
                   output_file_format="parquet")
    s = runner.run(c, engine=engine)
    assert s.rows == 15 and s.error_rows == 1
    return out


def test_generation_with_prompt_topk_exports_like_a_score_job(gen_topk, engine, tiny_model, tokenizer, tmp_path,
                                                              hf_logprobs):
    records = sorted(read_records(gen_topk), key=writer.row_key)
    for r in records:
        n = len(r["prompt_token_ids"])
        assert len(r["prompt_top_token_ids"]) == n and r["prompt_top_token_ids"][0] == []
        assert all(len(t) == K for t in r["prompt_top_token_ids"][1:] + r["top_token_ids"])
        assert r["prompt_token_logprobs"][0] is None and r["sampling"]["prompt_logprobs"] is True
    gen_dest = str(tmp_path / "gen-maxtext")
    assert shards.export(gen_topk, "maxtext-offline", gen_dest).examples == len(records)
    gen_examples = read_maxtext(gen_dest)
    # MaxText's convention over prompt + completion: row t = the model's top-k after tokens 0..t.
    # The example's inputs stop before the last generated token (nothing was computed after it).
    for r, g in zip(records, gen_examples):
        seq = r["prompt_token_ids"] + r["completion_token_ids"]
        assert g["inputs"].tolist() == seq[:-1] and g["top_k_indices"].shape == (len(seq) - 1, K)
        ref = hf_logprobs(seq)
        for t in range(len(seq) - 1):
            assert np.abs(g["top_k_logits"][t] - ref[t].topk(K).values.numpy()).max() < 1e-3 + 2 ** -10 * 20
    # A score job over the same texts: the texts are the generated token ids decoded (without BOS,
    # which the score job adds); its examples equal the generation job's for every position whose
    # tokens so far are the same ids (a random tiny model's bytes do not always re-encode alike).
    texts = [tokenizer.decode((r["prompt_token_ids"] + r["completion_token_ids"])[1:-1]) for r in records]
    corpus = tmp_path / "scored-texts"
    corpus.mkdir()
    pq.write_table(pa.table({"text": texts}), corpus / "t.parquet")
    out = str(tmp_path / "score-out")
    runner.run(job_config(model_path=tiny_model, dataset_path=str(corpus), output_path=out, task="score", logprobs=K,
                          add_bos=True, chunk_size=8, max_target_length=128), engine=engine)
    score_dest = str(tmp_path / "score-maxtext")
    shards.export(out, "maxtext-offline", score_dest)
    scored = read_maxtext(score_dest)
    assert len(scored) == len(records)
    compared = across_boundary = 0
    for r, g, s in zip(records, gen_examples, scored):
        a, b = g["inputs"].tolist(), s["inputs"].tolist()
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert same >= 2
        np.testing.assert_allclose(g["top_k_logits"][:same], s["top_k_logits"][:same], rtol=0,
                                   atol=1e-3 + 2 ** -10 * 20)  # float16 storage + engine numerics
        for gi, si, gv in zip(g["top_k_indices"][:same], s["top_k_indices"][:same], g["top_k_logits"][:same]):
            if gi.tolist() != si.tolist():  # only a tie within the tolerance may reorder ids
                assert sorted(gi.tolist()) == sorted(si.tolist()) or np.ptp(gv) < 2e-3
        compared += same
        across_boundary += same > len(r["prompt_token_ids"])
    assert compared >= 100 and across_boundary >= len(records) // 2, (compared, across_boundary)
    # DistillKit's rows from the same job: input_ids the whole sequence, row j = the distribution of
    # token j + 1, equal to the MaxText example's rows.
    dk = str(tmp_path / "dk")
    assert shards.export(gen_topk, "distillkit", dk).examples == len(records)
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=dk, split="train")
    assert set(ds.column_names) == {"input_ids", "token_ids", "top_values"}
    for row, r, g in zip(ds, records, gen_examples):
        assert row["input_ids"] == r["prompt_token_ids"] + r["completion_token_ids"]
        assert row["token_ids"] == g["top_k_indices"].tolist()
        np.testing.assert_array_equal(np.array(row["top_values"], np.float32), g["top_k_logits"])


def test_generation_without_prompt_topk_is_refused_for_maxtext(generated, tmp_path):
    out, _ = generated
    for to in ("maxtext-offline", "distillkit"):
        with pytest.raises(shards.ExportError, match="--prompt_logprobs"):
            shards.export(out, to, str(tmp_path / to), allow_partial=True)


def test_chat_job_messages_with_trl_prompt_completion(engine, tiny_model, tokenizer, tmp_path):
    """A chat job's messages export also holds TRL's conversational prompt-completion form, which
    TRL's data utilities and SFTTrainer's dataset preparation take (no training run)."""
    corpus = str(tmp_path / "corpus")
    tiny.make_corpus(corpus, num_files=1, rows_per_file=6, seed=9)
    out = str(tmp_path / "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=corpus, output_path=out, prompt_mode="chat",
                          prompt_column="text", system_prompt="Be brief.", max_target_length=96), engine=engine)
    dest = str(tmp_path / "msg")
    with pytest.raises(shards.ExportError, match="chat job.*--to messages"):
        shards.export(out, "text", str(tmp_path / "t"))
    n = len(read_records(out))
    assert n >= 3 and shards.export(out, "messages", dest, file_format="parquet").examples == n
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational

    ds = datasets.load_dataset("parquet", data_dir=dest, split="train")
    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["prompt"] == row["messages"][:2] and row["completion"] == row["messages"][2:]
        pc = {"prompt": row["prompt"], "completion": row["completion"]}
        assert is_conversational(pc)
        templated = apply_chat_template(pc, tokenizer)
        assert templated["prompt"] + templated["completion"] == tokenizer.apply_chat_template(
            row["messages"], tokenize=False)
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(model=LlamaForCausalLM.from_pretrained(tiny_model), processing_class=tokenizer,
                         train_dataset=ds.select_columns(["prompt", "completion"]),
                         args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True, bf16=False))
    prepared = trainer.train_dataset  # prepared by SFTTrainer: tokenized, the prompt masked out of the loss
    assert trainer.completion_only_loss and len(prepared) == n
    for labels in prepared["labels"]:
        assert labels[0] == -100 and labels[-1] != -100

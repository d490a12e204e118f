"""Presets (magpie: `instruction`, ultrachat: `prompt`), the conversations format, the language
filter, JSONL and parquet inputs, and the chat endpoint API."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen.worker import runner
from kdgen.views import audit
from kdgen.cli.main import main as cli_main
from tests.conftest import job_config
from tests.test_job import read_errors, read_records

INSTRUCTIONS = ["Write a short note about the river.", "Explain the attention layer.", "", "Name a city by the ocean.",
                "Describe a quiet winter morning.", "What is a teacher model?", None, "Build a small garden plan."]
LANGS = ["en", "en", "en", "de", "en", "fr", "en", "en"]


@pytest.fixture(scope="module")
def magpie(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("magpie") / "magpie-000.parquet")
    pq.write_table(pa.table({"instruction": INSTRUCTIONS, "language": LANGS,
                             "response": ["old answer"] * len(LANGS)}), path)
    return path


@pytest.fixture(scope="module")
def ultrachat(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ultrachat") / "ultrachat.jsonl")
    with open(path, "w") as f:
        for i, p in enumerate(INSTRUCTIONS):
            if p:
                f.write(json.dumps({"prompt": p, "prompt_id": str(i)}) + "\n")
    return path


def by_idx(records):
    return {r["metadata"]["idx"]: r for r in records}


def test_magpie_preset_conversations_and_language_filter(engine, tiny_model, magpie, tmp_path):
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=magpie, output_path=out, preset="magpie",
                   language_column="language", language="en", max_tokens=12, max_target_length=256,
                   system_prompt="You are terse.")
    assert (c.prompt_mode, c.prompt_column, c.output_format) == ("chat", "instruction", "conversations")
    s = runner.run(c, engine=engine)
    assert s.rows == 4 and s.error_rows == 4  # 2 filtered (de, fr), 1 empty, 1 null
    recs = by_idx(read_records(out))
    assert sorted(recs) == list(range(8))  # one line per input row, failed ones included
    ok = recs[0]
    assert ok["id"].endswith("-0") and [t["from"] for t in ok["conversations"]] == ["system", "human", "gpt"]
    assert ok["conversations"][1]["value"] == INSTRUCTIONS[0] and ok["conversations"][2]["value"]
    meta = ok["metadata"]
    assert meta["finish_reason"] in ("length", "stop") and meta["usage"]["completion_tokens"] <= 12
    assert recs[3]["metadata"]["error"] == "filtered: language is 'de', not 'en'"
    assert "empty" in recs[2]["metadata"]["error"] and "null" in recs[6]["metadata"]["error"]
    errors = {e["row_idx"]: e["error"] for e in read_errors(out)}
    assert sorted(errors) == [2, 3, 5, 6] and errors[5].startswith("filtered:")
    report = audit.audit(out)
    assert report["ok"] and report["rows_ok"] == 4 and report["rows_failed"] == 4
    assert {f["row_idx"] for f in report["failed_rows"]} == {2, 3, 5, 6}


def test_ultrachat_preset_jsonl_limit(engine, tiny_model, ultrachat, tmp_path):
    out = str(tmp_path / "out")
    c = job_config(model_path=tiny_model, dataset_path=ultrachat, output_path=out, preset="ultrachat",
                   limit=4, max_tokens=10, max_target_length=256)
    assert c.prompt_column == "prompt"
    s = runner.run(c, engine=engine)
    assert s.rows == 4 and s.error_rows == 0
    recs = by_idx(read_records(out))
    assert sorted(recs) == [0, 1, 2, 3]
    assert [t["from"] for t in recs[0]["conversations"]] == ["human", "gpt"]
    assert audit.audit(out)["ok"]


def test_chat_endpoint_matches_in_process_and_keeps_server_metadata(engine, tiny_model, ultrachat, vllm_server,
                                                                    tmp_path):
    """--endpoint_api chat: the server applies the (same) chat template to the messages."""
    settings = dict(model_path=tiny_model, dataset_path=ultrachat, preset="ultrachat", max_tokens=10,
                    max_target_length=256)
    ref = str(tmp_path / "ref")
    runner.run(job_config(output_path=ref, **settings), engine=engine)
    out = str(tmp_path / "out")
    runner.run(job_config(output_path=out, endpoint=vllm_server.url, endpoint_api="chat", **settings))
    got, want = by_idx(read_records(out)), by_idx(read_records(ref))
    assert sorted(got) == sorted(want) and len(got) == 6
    for i in got:
        assert got[i]["conversations"] == want[i]["conversations"]
        meta = got[i]["metadata"]
        assert meta["latency_s"] > 0 and meta["usage"]["prompt_tokens"] > 0 and meta["attempts"] == 1
    assert audit.audit(out)["ok"]


def test_audit_cli_lists_failed_rows(engine, tiny_model, magpie, tmp_path, capsys):
    out = str(tmp_path / "out")
    runner.run(job_config(model_path=tiny_model, dataset_path=magpie, output_path=out, preset="magpie",
                          max_tokens=4, max_target_length=256), engine=engine)
    cli_main(["audit", out])
    text = capsys.readouterr().out
    assert text.startswith("audit OK") and "failed row" in text and "instruction is empty" in text

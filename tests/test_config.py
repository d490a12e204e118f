"""Flags, env vars and the one-line errors for bad settings."""

from __future__ import annotations

import pytest

from kdgen import config
from kdgen.config import ConfigError

REQUIRED = dict(model_path="m", dataset_path="d", output_path="o")


def test_env_vars_and_flags_share_names():
    c = config.from_sources({"chunk_size": 7}, env={"MODEL_PATH": "m", "DATASET_PATH": "d", "OUTPUT_PATH": "o",
                                                    "CHUNK_SIZE": "99", "TEMPERATURE": "0.5", "ADD_BOS": "true"})
    assert c.chunk_size == 7 and c.temperature == 0.5 and c.add_bos is True and c.tokenizer == "m"


@pytest.mark.parametrize("flags,message", [
    ({"model_path": ""}, "MODEL_PATH / --model_path is required"),
    ({"chunk_size": 0}, "--chunk_size must be > 0"),
    ({"top_p": 1.5}, "--top_p must be in (0, 1]"),
    ({"prompt_mode": "raw"}, "--prompt_mode must be one of"),
    ({"max_prefill_length": 4096, "max_target_length": 4096}, "--max_target_length (4096) must exceed"),
    ({"preset": "alpaca"}, "--preset must be one of"),
    ({"host_index": 3, "num_hosts": 2}, "--host_index 3 must be in [0, --num_hosts=2)"),
    ({"nonsense": 1}, "unknown flag --nonsense"),
])
def test_bad_settings_name_the_flag(flags, message):
    with pytest.raises(ConfigError) as e:
        config.from_sources({**REQUIRED, **flags}, env={})
    assert message in str(e.value)


def test_score_needs_no_max_prefill_length():
    """Scoring has no prefill: the generation budget check (max_target_length > max_prefill_length)
    does not apply to it."""
    c = config.from_sources({**REQUIRED, "task": "score", "max_target_length": 48}, env={})
    assert c.max_target_length == 48
    with pytest.raises(ConfigError, match="--max_target_length .48. must exceed"):
        config.from_sources({**REQUIRED, "max_target_length": 48}, env={})


@pytest.mark.parametrize("flags,message", [
    ({"logprobs": 0}, "--prompt_logprobs needs --logprobs k > 0"),
    ({"logprobs": 5, "logprobs_mode": "processed"}, "--prompt_logprobs needs --logprobs_mode raw"),
    ({"logprobs": 5, "task": "score"}, "--prompt_logprobs is for generation"),
    ({"logprobs": 5, "endpoint": "http://h:1/v1", "endpoint_api": "chat", "prompt_mode": "chat"},
     "--prompt_logprobs through an endpoint needs --endpoint_api completions"),
])
def test_prompt_logprobs_settings(flags, message):
    with pytest.raises(ConfigError, match=message):
        config.from_sources({**REQUIRED, "prompt_logprobs": True, **flags}, env={})
    c = config.from_sources({**REQUIRED, "prompt_logprobs": True, "logprobs": 5}, env={})
    assert c.fingerprint()["prompt_logprobs"] is True and "prompt_logprobs" not in config.from_sources(
        {**REQUIRED, "logprobs": 5}, env={}).fingerprint()


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="env CHUNK_SIZE must be int, got 'lots'"):
        config.from_sources(REQUIRED, env={"CHUNK_SIZE": "lots"})


def test_host_detection_from_tpu_env():
    c = config.from_sources(REQUIRED, env={"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert (c.host_index, c.num_hosts) == (2, 4)
    assert (config.from_sources(REQUIRED, env={}).host_index, config.from_sources(REQUIRED, env={}).num_hosts) == (0, 1)


def test_preset_sets_chat_and_conversations_unless_overridden():
    c = config.from_sources({**REQUIRED, "preset": "magpie"}, env={})
    assert (c.prompt_mode, c.prompt_column, c.output_format) == ("chat", "instruction", "conversations")
    c = config.from_sources({**REQUIRED, "preset": "ultrachat", "output_format": "sequence_kd"}, env={})
    assert (c.prompt_column, c.output_format) == ("prompt", "sequence_kd")


def test_settings_doc_flag_table_is_current():
    import os

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "settings.md")).read()
    assert config.flag_table() in page, "docs/settings.md flag table is stale: paste the output of `kdgen flags`"


def test_gettexts_language_variable_is_not_taken_for_the_language_filter():
    """LANGUAGE=en_US:en is set on many systems: alone it is gettext's, not a filter (it used to
    make every run fail: '--language_column and --language go together')."""
    from kdgen import config as config_mod

    base = {"MODEL_PATH": "/m", "DATASET_PATH": "/d", "OUTPUT_PATH": "/o"}
    c = config_mod.from_sources({}, env={**base, "LANGUAGE": "en_US:en"})
    assert c.language == "" and c.language_column == ""
    c = config_mod.from_sources({}, env={**base, "LANGUAGE": "en", "LANGUAGE_COLUMN": "lang"})
    assert (c.language, c.language_column) == ("en", "lang")
    c = config_mod.from_sources({"language_column": "lang"}, env={**base, "LANGUAGE": "en"})
    assert c.language == "en"

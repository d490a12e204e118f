"""kdgen.generate: string and message inputs, n=1 and n>1, a system prompt, engine reuse, endpoint."""

from __future__ import annotations

import kdgen

PROMPTS = ["Write about the river.", "Explain attention.", "Name a city by the ocean."]


def test_generate_strings_n1_keeps_rows_and_order(engine, tiny_model):
    data = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    out = kdgen.generate(tiny_model, data, temperature=0.0, max_tokens=12, engine=engine)
    assert [r["id"] for r in out] == [0, 1, 2] and all(r["prompt"] == p for r, p in zip(out, PROMPTS))
    assert all(isinstance(r["results"], str) and r["results"] for r in out)
    assert "results" not in data[0]  # inputs are not modified
    again = kdgen.generate(tiny_model, PROMPTS, temperature=0.0, max_tokens=12, engine=engine)  # bare strings
    assert [r["results"] for r in again] == [r["results"] for r in out]


def test_generate_messages_equal_strings_and_system_prompt(engine, tiny_model):
    strings = kdgen.generate(tiny_model, [{"q": p} for p in PROMPTS], message_key="q", temperature=0.0,
                             max_tokens=12, engine=engine, result_key="answer")
    messages = kdgen.generate(tiny_model, [{"q": [{"role": "user", "content": p}]} for p in PROMPTS],
                              message_key="q", temperature=0.0, max_tokens=12, engine=engine, result_key="answer")
    assert [r["answer"] for r in messages] == [r["answer"] for r in strings]
    system = "You answer in one word."
    with_system = kdgen.generate(tiny_model, [{"q": p} for p in PROMPTS], message_key="q", system=system,
                                 temperature=0.0, max_tokens=12, engine=engine)
    explicit = kdgen.generate(tiny_model, [{"q": [{"role": "system", "content": system},
                                                  {"role": "user", "content": p}]} for p in PROMPTS],
                              message_key="q", temperature=0.0, max_tokens=12, engine=engine)
    assert [r["results"] for r in with_system] == [r["results"] for r in explicit]
    assert [r["results"] for r in with_system] != [r["answer"] for r in strings]
    # A conversation ending with an assistant turn: that turn is regenerated.
    convo = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": "old"}]
    regen = kdgen.generate(tiny_model, [{"prompt": convo}], temperature=0.0, max_tokens=12, engine=engine)
    assert regen[0]["results"] == strings[0]["answer"]


def test_generate_n3_and_row_errors(engine, tiny_model):
    data = [{"prompt": PROMPTS[0]}, {"prompt": ""}, {"prompt": [{"role": "user", "content": PROMPTS[1]}]}]
    out = kdgen.generate(tiny_model, data, n=3, temperature=1.0, max_tokens=8, engine=engine)
    for i in (0, 2):
        assert isinstance(out[i]["results"], list) and len(out[i]["results"]) == 3
        assert all(isinstance(t, str) for t in out[i]["results"])
    assert len(set(out[0]["results"])) > 1  # sampled, not three copies
    assert out[1]["results"] is None and "empty" in out[1]["results_error"]


def test_generate_through_an_endpoint_matches_in_process(engine, tiny_model, vllm_server):
    local = kdgen.generate(tiny_model, PROMPTS, temperature=0.0, max_tokens=12, engine=engine)
    remote = kdgen.generate(tiny_model, PROMPTS, temperature=0.0, max_tokens=12, endpoint=vllm_server.url,
                            endpoint_api_key=vllm_server.api_key)
    chat = kdgen.generate(tiny_model, PROMPTS, temperature=0.0, max_tokens=12, endpoint=vllm_server.url,
                          endpoint_api_key=vllm_server.api_key, endpoint_api="chat")
    assert [r["results"] for r in remote] == [r["results"] for r in local] == [r["results"] for r in chat]

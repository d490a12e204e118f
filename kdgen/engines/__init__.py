"""Engines: what turns prompts into completions, behind one small streaming contract.

The contract and the types that cross it (base.py); the request pool that keeps an engine full
(pool.py); the in-process vLLM engine (vllm_engine.py; every vLLM internal kdgen touches is in
vllm_adapter.py, the lean output path in vllm_lean.py), the OpenAI-compatible endpoint client
(endpoint.py, its HTTP transport in http.py) and the fake engine for tests and benchmarks
(fake.py), chosen from the settings by factory.py; the local caches engines start from
(model_cache.py for gs:// models, compile_cache.py for vLLM's compile artifacts). Scoring wraps
any of them (kdgen.score.ScoringEngine).
"""

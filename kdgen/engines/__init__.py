"""Engines: what turns prompts into completions, behind one small streaming contract.

The request pool that keeps an engine full (pool.py, with the result types every engine returns),
the in-process vLLM engine (vllm_engine.py: every vLLM internal kdgen touches lives there), the
OpenAI-compatible endpoint client (endpoint.py), and the local caches engines start from
(model_cache.py for gs:// models, compile_cache.py for vLLM's compile artifacts).
"""

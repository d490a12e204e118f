"""Greedy-generate with the real vLLM engine; run as a subprocess by verify_model.py --vllm.

    python -m converters.vllm_check MODEL_DIR '[[1, 2, 3], [4, 5]]' MAX_TOKENS [DTYPE]

prints one line `VLLM_RESULT {"tokens": [[...], ...]}`. EOS is ignored so that the comparison
with transformers covers every position.
"""

from __future__ import annotations

import json
import os
import sys


def generate(model: str, prompts: list[list[int]], max_tokens: int, dtype: str = "float32",
             max_model_len: int = 512) -> list[list[int]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # One short check: the engine core runs in this process. vLLM's default starts it in a process
    # of its own (and, on the CPU platform, the model worker in a third), each importing vLLM and
    # torch again: that doubled this check's start-up time for nothing it checks.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    toks = generate(model, prompts, n, dtype)
    print("VLLM_RESULT " + json.dumps({"tokens": toks}), flush=True)

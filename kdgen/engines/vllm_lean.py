"""The lean output path of the in-process vLLM engine: the engine core's per-step outputs (new token
ids, logprob arrays) are kept as they come, one list and two arrays a sample, and turned into
kdgen's Sample once, when the request ends, by one join and a few numpy slices: its top-k stay
numpy arrays (kdgen.engines.base.Sample), no Python object per token; vLLM's output processor
(RequestOutput, CompletionOutput, FlatLogprobs, its detokenizer) is not run.
The adapter (kdgen.engines.vllm_adapter) reads the outputs and their wire format.
"""

from __future__ import annotations

import numpy as np

from kdgen.engines.base import Finished, Sample
from kdgen.engines.vllm_adapter import stack_rows


class LeanSample:
    """One engine-core request: a sample of a kdgen request."""

    __slots__ = ("owner", "internal_id", "index", "token_ids", "top_ids", "top_lps", "finish_reason")

    def __init__(self, owner: "LeanRequest", internal_id: str, index: int):
        self.owner, self.internal_id, self.index = owner, internal_id, index
        self.token_ids: list[int] = []
        self.top_ids: list = []  # per step: [positions, width] arrays (or vLLM's wire form), the sampled token first
        self.top_lps: list = []
        self.finish_reason: str | None = None


class LeanRequest:
    __slots__ = ("request_id", "prompt_ids", "samples", "left")

    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.samples: list[LeanSample] = []
        self.left = 0


def add_output(s: LeanSample, token_ids: list[int], top_ids, top_lps) -> None:
    s.token_ids.extend(token_ids)
    if top_ids is not None:
        s.top_ids.append(top_ids)
        s.top_lps.append(top_lps)


def logprob_arrays(s: LeanSample, k: int) -> tuple:
    """(token logprob per position [n], top-k ids [n, k], top-k logprobs [n, k]) as numpy arrays
    holding the values convert_logprobs makes from vLLM's FlatLogprobs: column 0 is the sampled
    token, columns 1..k the top-k by rank (a step's arrays are as wide as the largest k of its
    batch: cut to k + 1). Views, not copies: the codecs copy them off the engine thread."""
    if not s.top_ids:
        return np.empty(0, np.float32), np.empty((0, k), np.int32), np.empty((0, k), np.float32)
    ids, lps = stack_rows(s.top_ids, k + 1), stack_rows(s.top_lps, k + 1)
    return lps[:, 0], ids[:, 1:], lps[:, 1:]


class LeanOutputs:
    """kdgen requests on the lean path, by kdgen id and by the engine core's internal ids."""

    def __init__(self):
        self.by_internal: dict[str, LeanSample] = {}
        self.requests: dict[str, LeanRequest] = {}
        self.ended: list[LeanRequest] = []

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, request_id: str, prompt_ids: list[int], children: list[tuple[str, int]]) -> None:
        req = LeanRequest(request_id, prompt_ids)
        for internal_id, index in children:
            s = LeanSample(req, internal_id, index)
            req.samples.append(s)
            self.by_internal[internal_id] = s
        req.left = len(req.samples)
        self.requests[request_id] = req

    def finish(self, s: LeanSample, reason: str) -> None:
        s.finish_reason = reason
        del self.by_internal[s.internal_id]
        req = s.owner
        req.left -= 1
        if req.left == 0 and self.requests.pop(req.request_id, None) is not None:
            self.ended.append(req)

    def drop(self, request_ids) -> list[str]:
        """Forget these kdgen requests; the internal ids of their unfinished samples."""
        internal = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            for s in req.samples if req is not None else ():
                if self.by_internal.pop(s.internal_id, None) is not None:
                    internal.append(s.internal_id)
        return internal

    def take_finished(self, k: int, decode, vllm_text: bool) -> list[Finished]:
        """The requests that ended since the last call, as Finished. decode(prompt ids, ids) is the
        text decoder; vllm_text: make the text as vLLM's detokenizer would (it leaves out the token
        that ended a sample by stop), else as kdgen decodes for detokenize=False (every token)."""
        done, self.ended = self.ended, []
        out = []
        for req in done:
            samples = []
            for s in sorted(req.samples, key=lambda s: s.index):
                ids = s.token_ids
                shown = ids[:-1] if vllm_text and s.finish_reason == "stop" and ids else ids
                sample = Sample(s.index, ids, decode(req.prompt_ids, shown).strip(), s.finish_reason)
                if k:
                    sample.token_logprobs, sample.top_token_ids, sample.top_logprobs = logprob_arrays(s, k)
                samples.append(sample)
            out.append(Finished(req.request_id, samples))
        return out

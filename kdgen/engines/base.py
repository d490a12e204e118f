"""The engine contract (Engine, at the end): what every engine (in-process vLLM, endpoint, scoring
wrapper, fake) offers the request pool, the worker, the Python API and scoring, and the types that
cross it. An engine that dies raises EngineError from add_many or step; the worker restarts
in-process engines (ENGINE_RESTARTS) and redoes what was in flight. This module imports no engine
and no vLLM.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Hashable, NamedTuple, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from kdgen.config import JobConfig


class EngineError(RuntimeError):
    """The engine died or refused a request; finished chunks are safe, in-flight ones are redone."""


# One position of prompt logprobs ({token id: Logprob}), shaped like vLLM's Logprob: what
# kdgen.engines.vllm_engine.convert_logprobs reads from every engine.
Logprob = namedtuple("Logprob", "logprob rank")


# A sample's top-k, one row per generated position: Python lists, or (the in-process vLLM
# engine's lean path) numpy arrays, so that no Python object is made per token on the engine
# thread: token_logprobs float32 [positions], top_token_ids int32 [positions, k], top_logprobs
# float32 [positions, k]. Records carry either form as it is; the JSONL and parquet codecs
# (kdgen.records) write both to the same bytes. Sample.lists() gives the list form.
LogprobRow = Union[list[float], "np.ndarray"]
TopK = Union[list[list[int]], list[list[float]], "np.ndarray"]


@dataclass
class Sample:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    # logit KD, when LOGPROBS=k: per generated position, the sampled token's logprob and top k.
    token_logprobs: LogprobRow | None = None
    top_token_ids: TopK | None = None
    top_logprobs: TopK | None = None
    reasoning: str | None = None  # endpoint engine: the server's reasoning_content, when given

    def lists(self) -> Sample:
        """This sample with its top-k as Python lists (arrays' tolist(): the values vLLM's own
        output path gives); itself when they are lists already."""
        arrays = {k: getattr(self, k).tolist() for k in ("token_logprobs", "top_token_ids", "top_logprobs")
                  if hasattr(getattr(self, k), "tolist")}
        return replace(self, **arrays) if arrays else self


@dataclass
class Finished:
    request_id: str
    samples: list[Sample]
    prompt_logprobs: list | dict | None = None  # scoring mode
    metadata: dict = field(default_factory=dict)  # latency, usage (endpoint engine)
    error: str | None = None  # the request was refused (endpoint 4xx): the row is an error record


@dataclass
class Request:
    """A request as the caller of the pool names it (kdgen.engines.pool gives it an engine id)."""
    key: Hashable  # the caller's name for the request: (chunk work, prompt index), a row index, ...
    token_ids: list[int]
    max_tokens: int
    messages: list[dict] | None = None  # chat endpoints; the token ids hold the templated chat
    seed: int | None = None  # sampling seed of this request (request_seed), where the engine takes one


class EngineRequest(NamedTuple):
    """One request as an engine gets it (a plain tuple (id, token ids, max tokens) also does)."""
    request_id: str
    token_ids: list[int]
    max_tokens: int
    messages: list[dict] | None = None
    seed: int | None = None


@runtime_checkable
class Engine(Protocol):
    """What the pool, the worker, the API and scoring use of an engine; nothing else."""

    max_model_len: int  # the model's context: prompt budgets are cut to it
    max_num_seqs: int  # requests it runs at once (GEN_BATCH_SIZE 0 keeps twice this many queued)

    def set_sampling(self, c: JobConfig) -> None: ...  # for the requests added from now on

    def add_many(self, requests: list[EngineRequest], **extra) -> None: ...  # extra: scoring's prompt_logprobs

    def step(self) -> list[Finished]: ...  # advance; the requests that finished

    def num_unfinished(self) -> int: ...  # requests queued or running

    def abort(self, request_ids: list[str]) -> None: ...  # stop these (a late result is dropped by the pool)

    def abort_all(self) -> None: ...  # stop everything in flight (a reused engine comes back empty)

    def close(self) -> None: ...

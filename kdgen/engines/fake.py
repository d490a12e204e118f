"""FakeEngine: a real engine backend with no model, for tests and benchmarks (FAKE_ENGINE).

It keeps the engine contract (kdgen.engines.base) the way VllmEngine does: completions are
deterministic, derived from the prompt ids and the seed (greedy: from the prompt alone), drawn from
the vocabulary of the model's tokenizer (its special tokens only as eos), n samples, max_tokens and
the model's context, top-k logprobs per generated (and, when asked, prompt) position, text decoded
with special tokens skipped. Stop strings are not applied. Requests run one after another, each
taking TOKEN_S per generated token; a step returns what finished within STEP_S of that work.
Scripted faults (a row that kills or hangs the engine) and timing: Script.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from typing import Callable

from kdgen.config import ConfigError, JobConfig
from kdgen.engines.base import EngineError, EngineRequest, Finished, Logprob, Sample

log = logging.getLogger(__name__)

EOS_CHANCE = 1 / 32  # per generated position, so that completions end by eos ("stop") as well as by length


@dataclasses.dataclass(frozen=True)
class Script:
    """FAKE_ENGINE's faults and timing, as vLLM shows them to the job (one script per engine; a
    restarted engine reads it again, so a poison row kills every engine it reaches), e.g.
    FAKE_ENGINE="token_s=0.002;die_on=17,201,5;stall_on=88,9"; "on" alone: no faults.
    die_on=IDS: a request whose prompt holds this token id sequence kills the engine (the next step
    raises EngineError, as VllmEngine does when its EngineCore died). stall_on=IDS: such a request
    hangs the engine, step() never returns (a SIGSTOPped EngineCore) until the process is killed
    (the watchdog does) or the engine is closed."""

    token_s: float = 0.0  # seconds of work per generated token
    step_s: float = 0.0  # a step returns the requests finished within this much work (at least one)
    max_num_seqs: int = 256
    die_on: tuple[int, ...] = ()
    stall_on: tuple[int, ...] = ()
    start_s: float = 0.0  # seconds the engine takes to start (vLLM's CPU engine: ~20 s here)
    salt: int = 0  # another salt, other completions: a row generated again differs (as on an unseeded vLLM)

    @classmethod
    def parse(cls, text: str) -> "Script":
        """FAKE_ENGINE's value: "on", or key=value pairs separated by ";" (see the class docstring)."""
        values: dict = {}
        for part in text.replace(" ", "").split(";"):
            if not part or part in ("on", "1", "true"):
                continue
            key, sep, value = part.partition("=")
            if not sep or key not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"FAKE_ENGINE: {part!r} is not key=value with a key of "
                                  f"{[f.name for f in dataclasses.fields(cls)]}")
            try:
                if key in ("die_on", "stall_on"):
                    values[key] = tuple(int(x) for x in value.split(",") if x)
                else:
                    values[key] = type(getattr(cls, key))(value)
            except ValueError:
                raise ConfigError(f"FAKE_ENGINE: {key}={value!r} is not a number") from None
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    size: int
    ordinary: tuple[int, ...]  # ids a completion draws from
    eos: int | None
    decode: Callable[[list[int]], str]
    max_model_len: int

    @classmethod
    def of_model(cls, c: JobConfig) -> "Vocabulary":
        """The vocabulary of MODEL_PATH's tokenizer (TOKENIZER_PATH), its eos and context length."""
        from kdgen.engines.vllm_engine import check_model_dir, localize_model
        from kdgen.prompts import load_tokenizer

        model = localize_model(c.model_path)
        check_model_dir(model, c.model_path)
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
        tok = load_tokenizer(localize_model(c.tokenizer))
        size = min(len(tok), config.get("vocab_size") or len(tok))
        special = set(tok.all_special_ids)
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=True)

        context = c.max_model_len or config.get("max_position_embeddings") or 2048
        return cls(size, tuple(i for i in range(size) if i not in special), eos, decode, context)


def contains(ids: list[int], marker: tuple[int, ...]) -> bool:
    n = len(marker)
    return n > 0 and any(tuple(ids[i:i + n]) == marker for i in range(len(ids) - n + 1))


class FakeEngine:
    """The engine contract over deterministic pseudo-completions (see the module docstring).
    `latency` replaces TOKEN_S: seconds of work of a request, called when it is added (fleet_sim
    draws each row's work there)."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self, c: JobConfig, script: Script | None = None, vocabulary: Vocabulary | None = None,
                 latency: Callable[[EngineRequest], float] | None = None):
        self.script = script if script is not None else Script.parse(c.fake_engine)
        time.sleep(self.script.start_s)
        self.vocab = vocabulary if vocabulary is not None else Vocabulary.of_model(c)
        self.max_model_len = self.vocab.max_model_len
        self.max_num_seqs = self.script.max_num_seqs
        self.latency = latency
        self._queue: collections.deque = collections.deque()  # (request, seconds of work)
        self._dead: str | None = None
        self._stalled = False
        self._closed = threading.Event()
        # What a benchmark reads: seconds spent working, requests finished, (start, end) of busy steps.
        self.busy_s = 0.0
        self.finished = 0
        self.busy_spans: list[tuple[float, float]] = []
        self.set_sampling(c)

    def set_sampling(self, c: JobConfig) -> None:
        self.c = c
        self._logprobs_k = c.logprobs

    def add_many(self, requests: list[EngineRequest], **extra) -> None:
        if self._dead:
            raise EngineError(f"fake engine refused requests: {self._dead}")
        for r in requests:
            r = EngineRequest(*r)
            self._queue.append((r, extra.get("prompt_logprobs"), self._work(r)))
            if contains(r.token_ids, self.script.die_on):
                self._dead = (f"fake engine died: EngineDeadError (request {r.request_id}'s prompt holds the "
                              f"FAKE_ENGINE die_on marker {list(self.script.die_on)})")
                log.warning("%s", self._dead)
            elif contains(r.token_ids, self.script.stall_on):
                log.warning("fake engine: request %s's prompt holds the FAKE_ENGINE stall_on marker %s: the "
                            "engine hangs from now on", r.request_id, list(self.script.stall_on))
                self._stalled = True

    def _work(self, r: EngineRequest) -> float:
        if self.latency is not None:
            return self.latency(r)
        return self.script.token_s * min(r.max_tokens, max(self.max_model_len - len(r.token_ids), 0))

    def num_unfinished(self) -> int:
        return len(self._queue)

    def step(self) -> list[Finished]:
        if self._stalled:
            self._closed.wait()  # a hung EngineCore: only the process's end (or close) ends this
        if self._dead or self._closed.is_set():
            self._queue.clear()
            raise EngineError(self._dead or "fake engine closed")
        done, work = [], 0.0
        while self._queue and (not done or work + self._queue[0][2] <= self.script.step_s):
            r, prompt_k, w = self._queue.popleft()
            work += w
            done.append(self._finish(r, prompt_k))
        if work:
            t0 = time.monotonic()
            time.sleep(work)
            self.busy_s += work
            self.busy_spans.append((t0, time.monotonic()))
        self.finished += len(done)
        return done

    def abort(self, request_ids: list[str]) -> None:
        drop = set(request_ids)
        self._queue = collections.deque(q for q in self._queue if q[0].request_id not in drop)

    def abort_all(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._closed.set()

    # ---- completions --------------------------------------------------------------------------
    def _finish(self, r: EngineRequest, prompt_k: int | None) -> Finished:
        c = self.c
        greedy = c.temperature == 0
        seed = c.seed if r.seed is None else r.seed
        n = 1 if prompt_k is not None else c.num_samples
        samples = [self._sample(r, i, 0 if greedy else seed + i) for i in range(n)]
        prompt_k = prompt_k if prompt_k is not None else (c.logprobs if c.prompt_logprobs else None)
        prompt_lps = self._prompt_logprobs(r.token_ids, prompt_k) if prompt_k else None
        return Finished(r.request_id, samples, prompt_logprobs=prompt_lps)

    def _rng(self, *parts) -> random.Random:
        digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "little"))

    def _sample(self, r: EngineRequest, index: int, seed: int) -> Sample:
        rng = self._rng(seed, self.script.salt, tuple(r.token_ids))
        budget = min(r.max_tokens, max(self.max_model_len - len(r.token_ids), 0))
        k, greedy = self._logprobs_k, self.c.temperature == 0
        ids, token_lps, top_ids, top_lps = [], [], [], []
        finish = "length"
        for _ in range(budget):
            tops, lps = self._position(rng, max(k, 1))
            if self.vocab.eos is not None and rng.random() < EOS_CHANCE:
                token, lp = self.vocab.eos, math.log(EOS_CHANCE)
            else:
                j = 0 if greedy else rng.choices(range(len(tops)), weights=[math.exp(x) for x in lps])[0]
                token, lp = tops[j], lps[j]
            ids.append(token)
            token_lps.append(lp)
            top_ids.append(tops[:k])
            top_lps.append(lps[:k])
            if token == self.vocab.eos:
                finish = "stop"
                break
        s = Sample(index, ids, self.vocab.decode(ids).strip(), finish)
        if k:
            s.token_logprobs, s.top_token_ids, s.top_logprobs = token_lps, top_ids, top_lps
        return s

    def _position(self, rng: random.Random, k: int) -> tuple[list[int], list[float]]:
        """k distinct ids, most likely first, with log-probabilities that leave mass to the rest."""
        tops = rng.sample(self.vocab.ordinary, min(k, len(self.vocab.ordinary)))
        weights = sorted((rng.random() for _ in tops), reverse=True)
        total = sum(weights) + 1.0  # the rest of the vocabulary
        return tops, [math.log(w / total) if w > 0 else -1e9 for w in weights]

    def _prompt_logprobs(self, ids: list[int], k: int) -> list:
        """vLLM's shape: None for the first position, then {token id: Logprob} holding the prompt's
        own token and the top k (ranks from 1)."""
        rng = self._rng("prompt", tuple(ids))
        out: list = [None]
        for t in ids[1:]:
            tops, lps = self._position(rng, k)
            d = {tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate(zip(tops, lps), start=1)}
            if t not in d:
                d[t] = Logprob(lps[-1] - 1.0, k + 1 + rng.randrange(max(self.vocab.size - k, 1)))
            out.append(d)
        return out

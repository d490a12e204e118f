"""Scoring mode (`kdgen score`, TASK=score): the teacher's logprobs of given text, no generation.

Inputs: texts (TEXT_COLUMN; every token scored, BOS first with --add_bos; a text longer than
MAX_TARGET_LENGTH tokens or the model's context is cut into segments, each scored alone as a trainer
with that sequence length sees it), or prompt/completion pairs (COMPLETION_COLUMN after the prompt:
TEXT_COLUMN, or in chat mode the chat-templated PROMPT_COLUMN / MESSAGES_COLUMN). Any engine runs
it (ScoringEngine: max_tokens=1, prompt_logprobs=k; an endpoint needs vLLM's prompt_logprobs
extension on /v1/completions). The output is chunk objects like generation's (resume, claims,
audit), one record per row: the SCORE fields of kdgen.records.schema (see score_records).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from kdgen.config import JobConfig
from kdgen.engines.base import Engine, EngineError, EngineRequest, Finished
from kdgen.engines.pool import in_flight_target
from kdgen.engines.vllm_engine import convert_logprobs
from kdgen.prompts import Prompt, PromptBuilder, column_values, language_filter

log = logging.getLogger(__name__)


@dataclass
class ScorePrompt(Prompt):
    completion_start: int | None = None  # pairs: first token of the completion


def segment_length(c: JobConfig, max_model_len: int) -> int | None:
    """Tokens per scored segment of a text (None: pairs are never cut). One request scores at most
    max_model_len - 1 prompt tokens (it generates one more, for the top-k after the last)."""
    if c.completion_column:
        return None
    return max(1, min(c.max_target_length, max_model_len - 1))


def segment_starts(n: int, length: int | None) -> list[int]:
    return list(range(0, n, length)) if length else [0]


class ScoreBuilder(PromptBuilder):
    """Rows -> the token ids to score (texts longer than a segment are cut at score time; a pair
    longer than the model is an error)."""

    def __init__(self, config: JobConfig, tokenizer, max_model_len: int):
        # Not PromptBuilder.__init__: its checks are about generation budgets, not scoring.
        self.c, self.tok, self.max_model_len = config, tokenizer, max_model_len
        if config.prompt_mode == "chat" and not config.completion_column:
            raise ValueError("scoring in chat mode needs --completion_column")
        if config.prompt_mode == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--prompt_mode chat needs a chat template; the tokenizer at {config.tokenizer!r} has none")
        self.segment = segment_length(config, max_model_len)
        if self.segment is not None and self.segment < config.max_target_length:
            log.warning("texts are scored in segments of %d tokens (the model's context %d allows no more), "
                        "not MAX_TARGET_LENGTH %d", self.segment, max_model_len, config.max_target_length)

    def build_table(self, table, row_start: int) -> list[Prompt]:
        cols = list(self.columns())
        firsts, bad = column_values(table, cols[0])
        completions = None
        if self.c.completion_column:
            completions, bad_completions = column_values(table, self.c.completion_column)
            bad = {**bad_completions, **bad}
        prompts = [ScorePrompt(row_idx=row_start + i) for i in range(len(firsts))]
        bos = [self.tok.bos_token_id] if self.c.add_bos and self.tok.bos_token_id is not None else []
        for i, p in enumerate(prompts):
            if i in bad:
                p.error = bad[i]
                continue
            if completions is None:
                text = firsts[i]
                if not isinstance(text, str) or not text:
                    p.error = f"{self.c.text_column} is {'empty' if text == '' else type(text).__name__}"
                    continue
                p.token_ids = bos + self.tok(text, add_special_tokens=False)["input_ids"]
            else:
                completion = completions[i]
                if not isinstance(completion, str) or not completion:
                    p.error = f"{self.c.completion_column} is {'empty' if completion == '' else type(completion).__name__}"
                    continue
                head, p.error = self.prompt_ids(firsts[i], bos)
                if p.error:
                    continue
                p.completion_start = len(head)
                p.token_ids = head + self.tok(completion, add_special_tokens=False)["input_ids"]
            if len(p.token_ids) < 2:
                p.error = "fewer than 2 tokens: nothing to score"
            elif self.segment is None and len(p.token_ids) > self.max_model_len - 1:
                p.error = f"{len(p.token_ids)} tokens; the model scores at most {self.max_model_len - 1}"
            else:
                p.max_tokens = 1
        return language_filter(self.c, prompts, table)

    def prompt_ids(self, value, bos: list[int]) -> tuple[list[int], str | None]:
        if self.c.prompt_mode == "prefix":
            if not isinstance(value, str):
                return [], f"{self.c.text_column} is {type(value).__name__}, expected a string"
            return bos + self.tok(value, add_special_tokens=False)["input_ids"], None
        messages, error = self.conversation(value)
        if error:
            return [], error
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"], None


class ScoringEngine:
    """Wraps an engine (in-process or endpoint): each request's tokens are cut into segments (see
    segment_length), every segment becomes a request with max_tokens=1, prompt_logprobs=k and
    logprobs=k (the top-k after its last token), and the request's Finished comes back once all
    its segments are done, with prompt_logprobs replaced by plain lists (see score_records)."""

    max_model_len: int
    max_num_seqs: int

    def __init__(self, inner: Engine, c: JobConfig):
        self.inner = inner
        self.max_model_len = inner.max_model_len
        self.max_num_seqs = inner.max_num_seqs
        self._pending: dict[str, list] = {}  # request id -> [token ids, starts, {segment: Finished}]
        self.set_sampling(c)

    def set_sampling(self, c: JobConfig) -> None:
        self.k = c.logprobs
        self.segment = segment_length(c, self.max_model_len)
        self.inner.set_sampling(dataclasses.replace(c, temperature=0.0, num_samples=1, stop=""))

    def add_many(self, requests: list[EngineRequest], **extra) -> None:
        subs = []
        for r in requests:
            rid, ids = r[0], r[1]
            starts = segment_starts(len(ids), self.segment)
            self._pending[rid] = [ids, starts, {}]
            subs += [EngineRequest(f"{rid}#{j}", ids[s:s + (self.segment or len(ids))], 1)
                     for j, s in enumerate(starts)]
        self.inner.add_many(subs, prompt_logprobs=self.k, **extra)

    def num_unfinished(self) -> int:
        return len(self._pending)

    def step(self) -> list[Finished]:
        done = []
        for f in self.inner.step():
            rid, _, j = f.request_id.rpartition("#")
            if rid not in self._pending:  # aborted meanwhile (an endpoint's late reply)
                continue
            ids, starts, parts = self._pending[rid]
            parts[int(j)] = f
            if len(parts) == len(starts):
                del self._pending[rid]
                done.append(self._combine(rid, ids, starts, [parts[i] for i in range(len(starts))]))
        return done

    def _combine(self, rid: str, ids: list[int], starts: list[int], parts: list[Finished]) -> Finished:
        errors = [f.error for f in parts if f.error is not None]
        if errors:
            return Finished(rid, [], error=errors[0], metadata=parts[0].metadata)
        ends = starts[1:] + [len(ids)]
        lps, top_ids, top_lps, next_ids, next_lps = [], [], [], [], []
        for f, s, e in zip(parts, starts, ends):
            a, b, c = plain_prompt_logprobs(ids[s:e], f.prompt_logprobs, self.k)
            lps += a
            top_ids += b
            top_lps += c
            sample = f.samples[0].lists() if f.samples else None  # one position: lists, whichever path
            if self.k and (sample is None or not sample.top_token_ids):
                raise EngineError(f"request {rid}: the engine returned no logprobs for the position after the "
                                  f"text; scoring with --logprobs needs them")
            if self.k:
                next_ids.append(sample.top_token_ids[0])
                next_lps.append(sample.top_logprobs[0])
        scored = {"token_logprobs": lps, "segment_starts": starts}
        if self.k:
            scored.update(top_token_ids=top_ids, top_logprobs=top_lps, next_top_token_ids=next_ids,
                          next_top_logprobs=next_lps)
        meta = dict(parts[0].metadata)
        if len(parts) > 1 and "latency_s" in meta:
            meta["latency_s"] = round(sum(f.metadata.get("latency_s", 0.0) for f in parts), 4)
        return Finished(rid, [], prompt_logprobs=scored, metadata=meta)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests and every segment of theirs still in the inner engine."""
        subs = []
        for rid in request_ids:
            pending = self._pending.pop(rid, None)
            if pending is not None:
                subs += [f"{rid}#{j}" for j in range(len(pending[1])) if j not in pending[2]]
        if subs:
            self.inner.abort(subs)

    def abort_all(self) -> None:
        self._pending.clear()
        self.inner.abort_all()

    def close(self) -> None:
        self.inner.close()


def plain_prompt_logprobs(token_ids: list[int], positions, k: int):
    """vLLM prompt_logprobs ([None, {id: Logprob}, ...]) -> (token_logprobs, top_ids, top_lps)."""
    if positions is None:
        raise ValueError("the engine returned no prompt logprobs")
    lps, top_ids, top_lps = convert_logprobs(token_ids[1:], positions[1:], k)
    return [None] + lps, [[]] + top_ids, [[]] + top_lps


def score_records(chunk, prompt: Prompt, finished: Finished) -> list[dict]:
    """A row's one score record: token_logprobs[t] = log p(token t | the tokens before it in its
    segment), null at each segment start (no context); top_token_ids[t] / top_logprobs[t] the
    top-LOGPROBS of that same distribution ([] at segment starts); next_top_*[j] the top-LOGPROBS
    after the last token of segment j (the engine's one generated position). So every token has the
    top-k of the distribution that predicts the token after it: what MaxText's offline distillation
    reads (kdgen export --to maxtext-offline)."""
    scored = finished.prompt_logprobs
    r = {"parquet_file": chunk.file, "row_idx": prompt.row_idx, "token_ids": prompt.token_ids, **scored}
    start = getattr(prompt, "completion_start", None)
    if start is not None:
        lps = scored["token_logprobs"]
        r["completion_start"], r["completion_end"] = start, len(prompt.token_ids)
        r["completion_logprob"] = sum(x for x in lps[max(start, 1):] if x is not None)
    if finished.metadata:
        r["metadata"] = finished.metadata
    return [r]


def score_texts(texts=None, *, model: str | None = None, pairs=None, engine=None, tokenizer=None,
          logprobs: int = 0, add_bos: bool = True, prompt_mode: str = "prefix", **settings) -> list[dict]:
    """In Python: score a list of texts, or of (prompt, completion) pairs; one dict per input with
    token_ids, token_logprobs (first None), [top_token_ids, top_logprobs], [completion span]."""
    from kdgen.api import api_config, drain, engine_and_tokenizer

    if (texts is None) == (pairs is None):
        raise ValueError("score() takes texts or pairs, not both")
    rows = ([{"text": t} for t in texts] if texts is not None
            else [{"prompt": p, "completion": c} for p, c in pairs])
    c = api_config(model, engine, dict(task="score", logprobs=logprobs, add_bos=add_bos, prompt_mode=prompt_mode,
                                    text_column="text" if texts is not None else "prompt",
                                    completion_column="" if texts is not None else "completion",
                                    temperature=0.0, **settings))
    eng, tok, own = engine_and_tokenizer(c, engine, tokenizer)
    try:
        import pyarrow as pa

        builder = ScoreBuilder(c, tok, eng.max_model_len)
        prompts = builder.build_table(pa.Table.from_pylist(rows), 0)
        results = drain(ScoringEngine(eng, c), prompts, in_flight_target(c, eng))
    finally:
        if own:
            eng.close()

    class _Chunk:
        file = ""

    out = []
    for p in prompts:
        f = results.get(p.row_idx)
        if p.error is None and f is not None and f.error is None:
            r = score_records(_Chunk, p, f)[0]
            for key in ("parquet_file", "row_idx", "metadata"):
                r.pop(key, None)
        else:
            r = {"error": p.error or (f.error if f else "no result")}
        out.append(r)
    return out

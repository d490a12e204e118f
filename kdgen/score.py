"""Scoring mode (`kdgen score`, TASK=score): the teacher's logprobs of given text, no generation.

Two inputs:
  * texts: TEXT_COLUMN (prefix mode); every token is scored (BOS first with --add_bos, so that
    the first text token gets a logprob too);
  * prompt/completion pairs: COMPLETION_COLUMN plus the prompt (TEXT_COLUMN in prefix mode, the
    chat-templated PROMPT_COLUMN / MESSAGES_COLUMN in chat mode); the completion's tokens follow
    the prompt's, and the record gives the completion span [completion_start, completion_end).

The same engines run it: in-process vLLM with SamplingParams(max_tokens=1, prompt_logprobs=k),
the endpoint engine with vLLM's `prompt_logprobs` extra parameter on /v1/completions. The output
is chunk objects like generation (resume, claims, audit): one record per row,
    {parquet_file, row_idx, token_ids, token_logprobs, [top_token_ids, top_logprobs],
     [completion_start, completion_end, completion_logprob]}
where token_logprobs[0] is null (the first token has no context) and top-k is LOGPROBS (0 = off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdgen.config import JobConfig
from kdgen.engine import Finished, convert_logprobs, in_flight_target
from kdgen.prompts import Prompt, PromptBuilder, language_filter


@dataclass
class ScorePrompt(Prompt):
    completion_start: int | None = None  # pairs: first token of the completion


class ScoreBuilder(PromptBuilder):
    """Rows -> the token ids to score (no truncation: a row longer than the model is an error)."""

    def __init__(self, config: JobConfig, tokenizer, max_model_len: int):
        # Not PromptBuilder.__init__: its checks are about generation budgets, not scoring.
        self.c, self.tok, self.max_model_len = config, tokenizer, max_model_len
        if config.prompt_mode == "chat" and not config.completion_column:
            raise ValueError("scoring in chat mode needs --completion_column")
        if config.prompt_mode == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--prompt_mode chat needs a chat template; the tokenizer at {config.tokenizer!r} has none")

    def build_table(self, table, row_start: int) -> list[Prompt]:
        cols = list(self.columns())
        firsts = table.column(cols[0]).to_pylist()
        completions = table.column(self.c.completion_column).to_pylist() if self.c.completion_column else None
        prompts = [ScorePrompt(row_idx=row_start + i) for i in range(len(firsts))]
        bos = [self.tok.bos_token_id] if self.c.add_bos and self.tok.bos_token_id is not None else []
        for i, p in enumerate(prompts):
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
            elif len(p.token_ids) > self.max_model_len - 1:
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
    """Wraps an engine (in-process or endpoint): every request becomes max_tokens=1 with
    prompt_logprobs=k, and Finished.prompt_logprobs comes back as plain lists
    (token_logprobs, top_token_ids, top_logprobs), position 0 being None."""

    def __init__(self, inner, c: JobConfig):
        self.inner = inner
        self.k = c.logprobs
        self.max_model_len = inner.max_model_len
        self.max_num_seqs = getattr(inner, "max_num_seqs", 256)
        self._ids: dict[str, list[int]] = {}
        self.set_sampling(c)

    def set_sampling(self, c: JobConfig) -> None:
        self.k = c.logprobs
        self.inner.set_sampling(dataclasses.replace(c, temperature=0.0, num_samples=1, logprobs=0, stop=""))

    def add_many(self, requests: list[tuple], **extra) -> None:
        for r in requests:
            self._ids[r[0]] = r[1]
        self.inner.add_many([(r[0], r[1], 1) for r in requests], prompt_logprobs=self.k, **extra)

    def num_unfinished(self) -> int:
        return self.inner.num_unfinished()

    def step(self) -> list[Finished]:
        done = self.inner.step()
        for f in done:
            ids = self._ids.pop(f.request_id)
            if f.error is None:
                f.prompt_logprobs = plain_prompt_logprobs(ids, f.prompt_logprobs, self.k)
        return done

    def abort_all(self) -> None:
        self._ids.clear()
        getattr(self.inner, "abort_all", lambda: None)()

    def close(self) -> None:
        self.inner.close()


def plain_prompt_logprobs(token_ids: list[int], positions, k: int):
    """vLLM prompt_logprobs ([None, {id: Logprob}, ...]) -> (token_logprobs, top_ids, top_lps)."""
    if positions is None:
        raise ValueError("the engine returned no prompt logprobs")
    lps, top_ids, top_lps = convert_logprobs(token_ids[1:], positions[1:], k)
    return [None] + lps, [[]] + top_ids, [[]] + top_lps


def score_records(chunk, prompt: Prompt, finished: Finished) -> list[dict]:
    lps, top_ids, top_lps = finished.prompt_logprobs
    r = {"parquet_file": chunk.file, "row_idx": prompt.row_idx, "token_ids": prompt.token_ids,
         "token_logprobs": lps}
    if top_ids and any(top_ids):
        r["top_token_ids"] = top_ids
        r["top_logprobs"] = top_lps
    start = getattr(prompt, "completion_start", None)
    if start is not None:
        r["completion_start"], r["completion_end"] = start, len(prompt.token_ids)
        r["completion_logprob"] = sum(x for x in lps[max(start, 1):] if x is not None)
    if finished.metadata:
        r["metadata"] = finished.metadata
    return [r]


def score_texts(texts=None, *, model: str | None = None, pairs=None, engine=None, tokenizer=None,
          logprobs: int = 0, add_bos: bool = True, prompt_mode: str = "prefix", **settings) -> list[dict]:
    """In Python: score a list of texts, or of (prompt, completion) pairs; one dict per input with
    token_ids, token_logprobs (first None), [top_token_ids, top_logprobs], [completion span]."""
    from kdgen.api import _config, _engine_and_tokenizer, _drain

    if (texts is None) == (pairs is None):
        raise ValueError("score() takes texts or pairs, not both")
    rows = ([{"text": t} for t in texts] if texts is not None
            else [{"prompt": p, "completion": c} for p, c in pairs])
    c = _config(model, engine, dict(task="score", logprobs=logprobs, add_bos=add_bos, prompt_mode=prompt_mode,
                                    text_column="text" if texts is not None else "prompt",
                                    completion_column="" if texts is not None else "completion",
                                    temperature=0.0, **settings))
    eng, tok, own = _engine_and_tokenizer(c, engine, tokenizer)
    try:
        import pyarrow as pa

        builder = ScoreBuilder(c, tok, eng.max_model_len)
        prompts = builder.build_table(pa.Table.from_pylist(rows), 0)
        results = _drain(ScoringEngine(eng, c), prompts, in_flight_target(c, eng))
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

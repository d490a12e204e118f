"""Rows -> engine prompts: a token prefix (sequence KD) or a chat-templated conversation.

Each row becomes a Prompt with its token ids and completion budget, or an error that names
the row and the reason; bad rows are never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kdgen.config import ConfigError, JobConfig
from kdgen.records.schema import ROLE_ALIASES

log = logging.getLogger(__name__)

# Tokenizing a 100 kB document to keep its first 1024 tokens is wasteful: tokenize a character
# prefix first, and only fall back to the whole text when that prefix yields too few tokens.
CHARS_PER_TOKEN_BOUND = 16
BOUNDARY_MARGIN_TOKENS = 128

# What may make a row an error record: only the row's own data. "data": the row cannot be
# sent or was refused for its content (null/empty/wrong type, too long, a chat template that
# fails on it, a row group whose bytes do not decode, a 4xx the server explains); "filtered":
# --language dropped it; "quarantined": the engine died on this row alone, MAX_CHUNK_ATTEMPTS
# times (kdgen.worker.schedule; its reason starts with partial.QUARANTINE_PREFIX). Storage, credential,
# server and engine failures of the job never make error records: they stop the job or are
# retried. `kdgen audit` fails on error records of any other kind.
DATA_ERROR_KINDS = frozenset({"data", "filtered", "quarantined"})


@dataclass
class Prompt:
    row_idx: int  # row index in the parquet file
    token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 0
    prefix: str = ""  # prefix mode: decoded prefix; chat mode: the last user turn
    messages: list[dict] | None = None  # chat mode: the conversation sent (system prompt included)
    error: str | None = None  # set when the row cannot be sent; an error row of its chunk object
    error_kind: str = "data"  # with error: one of DATA_ERROR_KINDS


def input_columns(c: JobConfig) -> dict[str, str]:
    """The input columns this job reads, with the kind each must be; the prompt column first."""
    if c.prompt_mode == "prefix":
        cols = {c.text_column: "string"}
    elif c.messages_column:
        cols = {c.messages_column: "messages"}
    else:
        cols = {c.prompt_column: "string"}
    if c.completion_column:  # scoring pairs
        cols[c.completion_column] = "string"
    if c.language_column:
        cols.setdefault(c.language_column, "any")
    return cols


def column_values(table, column: str) -> tuple[list, dict[int, str]]:
    """The Python values of a column, and {position: reason} for the cells that hold text that
    is not valid UTF-8 (parquet does not check it; such a cell is None in the values). Those
    rows' own data is bad: they become error records, the other rows are generated."""
    col = table.column(column)
    try:
        return col.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    values, bad = [], {}
    for i in range(len(col)):  # only for a batch that holds such a cell
        try:
            values.append(col[i].as_py())
        except UnicodeDecodeError as e:
            values.append(None)
            bad[i] = (f"{column} is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at position {e.start}: "
                      f"{e.reason})")
    return values, bad


def mark_bad_cells(prompts: list["Prompt"], bad: dict[int, str]) -> list["Prompt"]:
    """Rows whose cell is not valid UTF-8 (column_values) become data error records."""
    for i, reason in bad.items():
        p = prompts[i]
        p.error, p.error_kind, p.token_ids, p.max_tokens = reason, "data", [], 0
    return prompts


def language_filter(c: JobConfig, prompts: list["Prompt"], table) -> list["Prompt"]:
    """--language_column/--language: rows in another language become 'filtered' error records
    (so that the audit accounts for every row)."""
    if not c.language_column:
        return prompts
    langs, bad = column_values(table, c.language_column)
    mark_bad_cells(prompts, {i: r for i, r in bad.items() if prompts[i].error is None})
    for p, lang in zip(prompts, langs):
        if p.error is None and lang != c.language:
            p.error = f"filtered: {c.language_column} is {lang!r}, not {c.language!r}"
            p.error_kind = "filtered"
            p.token_ids, p.max_tokens = [], 0
    return prompts


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"TOKENIZER_PATH {path!r} is not a HuggingFace tokenizer directory "
            f"({str(e).splitlines()[0]})"
        ) from None


class PromptBuilder:
    def __init__(self, config: JobConfig, tokenizer, max_model_len: int):
        self.c = config
        self.tok = tokenizer
        self.max_model_len = max_model_len
        if config.prompt_mode == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"--prompt_mode chat needs a chat template, but the tokenizer at "
                f"{config.tokenizer!r} has none"
            )
        if config.prompt_mode == "prefix" and config.max_prefill_length + config.add_bos >= max_model_len:
            raise ConfigError(
                f"--max_prefill_length {config.max_prefill_length} leaves no room to generate: the "
                f"model's context (max_model_len) is {max_model_len} tokens")
        if config.max_target_length > max_model_len:
            log.warning("max_target_length %d exceeds the model's context %d: completions are capped at "
                        "%d - len(prompt) tokens", config.max_target_length, max_model_len, max_model_len)

    def columns(self) -> dict[str, str]:
        return input_columns(self.c)

    # ---- budget -------------------------------------------------------------------------------
    def budget(self, prompt: Prompt) -> Prompt:
        n = len(prompt.token_ids)
        if n >= self.max_model_len:
            prompt.error = f"prompt has {n} tokens; the model allows at most {self.max_model_len - 1}"
            return prompt
        room = self.c.max_target_length - n
        want = min(self.c.max_tokens, room) if self.c.max_tokens > 0 else room
        want = min(want, self.max_model_len - n)
        if want <= 0:
            prompt.error = (
                f"prompt has {n} tokens; max_target_length {self.c.max_target_length} leaves no room "
                f"to generate")
        prompt.max_tokens = max(want, 0)
        return prompt

    # ---- prefix mode --------------------------------------------------------------------------
    def encode_prefixes(self, texts: list[str]) -> list[list[int]]:
        limit = self.c.max_prefill_length
        cut = limit * CHARS_PER_TOKEN_BOUND
        heads = [t[:cut] for t in texts]
        ids = self.tok(heads, add_special_tokens=False)["input_ids"]
        redo = [i for i, (t, x) in enumerate(zip(texts, ids))
                if len(t) > cut and len(x) <= limit + BOUNDARY_MARGIN_TOKENS]
        if redo:
            full = self.tok([texts[i] for i in redo], add_special_tokens=False)["input_ids"]
            for i, x in zip(redo, full):
                ids[i] = x
        return [x[:limit] for x in ids]

    def prefix_prompts(self, texts: list, row_start: int) -> list[Prompt]:
        prompts = [Prompt(row_idx=row_start + i) for i in range(len(texts))]
        good = []
        for p, t in zip(prompts, texts):
            if t is None:
                p.error = f"{self.c.text_column} is null"
            elif not isinstance(t, str):
                p.error = f"{self.c.text_column} is {type(t).__name__}, expected a string"
            elif not t.strip():
                p.error = f"{self.c.text_column} is empty"
            else:
                good.append(p)
        if good:
            ids = self.encode_prefixes([texts[p.row_idx - row_start] for p in good])
            bos = [self.tok.bos_token_id] if self.c.add_bos and self.tok.bos_token_id is not None else []
            decoded = self.tok.batch_decode(ids)
            for p, x, text in zip(good, ids, decoded):
                p.token_ids = bos + x
                p.prefix = text
                self.budget(p)
        return prompts

    # ---- chat mode ----------------------------------------------------------------------------
    def conversation(self, value) -> tuple[list[dict] | None, str | None]:
        """A row's value -> chat messages ending with a user turn, or an error."""
        c = self.c
        if value is None:
            return None, f"{c.messages_column or c.prompt_column} is null"
        if isinstance(value, str):
            if not value.strip():
                return None, f"{c.prompt_column} is empty"
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, (list, tuple)):
            messages = []
            for m in value:
                if not isinstance(m, dict):
                    return None, f"{c.messages_column} holds {type(m).__name__}, expected role/content"
                role = m.get("role", m.get("from"))
                content = m.get("content", m.get("value"))
                if role is None or content is None:
                    return None, f"{c.messages_column} has a message without role/content: {m!r}"[:200]
                messages.append({"role": ROLE_ALIASES.get(role, role), "content": content})
            # Regenerate the answer: drop a trailing assistant turn.
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                return None, f"{c.messages_column} has no user turn"
        else:
            return None, f"{c.prompt_column} is {type(value).__name__}, expected a string"
        if c.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": c.system_prompt}] + messages
        return messages, None

    def chat_prompts(self, values: list, row_start: int) -> list[Prompt]:
        prompts = []
        good = []
        for i, v in enumerate(values):
            messages, error = self.conversation(v)
            p = Prompt(row_idx=row_start + i, messages=messages, error=error)
            if messages:
                p.prefix = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
                good.append(p)
            prompts.append(p)
        if good:
            try:
                texts = self.tok.apply_chat_template(
                    [p.messages for p in good], tokenize=False, add_generation_prompt=True)
            except Exception:  # a template that refuses some conversation: find which, row by row
                texts = [self.template_one(p) for p in good]
                good = [p for p, t in zip(good, texts) if t is not None]
                texts = [t for t in texts if t is not None]
            if good:
                # The template already holds the BOS text; do not add another.
                ids = self.tok(texts, add_special_tokens=False)["input_ids"]
                for p, x in zip(good, ids):
                    p.token_ids = x
                    self.budget(p)
        return prompts

    def template_one(self, p: Prompt) -> str | None:
        """The chat template applied to one row; on failure the row becomes an error record with
        the template's message (e.g. roles that do not alternate, an unknown role)."""
        try:
            return self.tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            msg = " ".join(str(e).split())[:300] or type(e).__name__
            p.error, p.error_kind = f"the chat template refused this conversation: {msg}", "data"
            return None

    def build_table(self, table, row_start: int) -> list[Prompt]:
        """Prompts for the rows of a table read with columns() (the runner's entry point)."""
        first = next(iter(self.columns()))
        values, bad = column_values(table, first)
        return language_filter(self.c, mark_bad_cells(self.build(values, row_start), bad), table)

    def build(self, values: list, row_start: int) -> list[Prompt]:
        if self.c.prompt_mode == "prefix":
            return self.prefix_prompts(values, row_start)
        return self.chat_prompts(values, row_start)

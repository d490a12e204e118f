"""The record schema, defined once: every field of every record kind, its parquet type, the
setting that adds it and what it means. The JSONL builders (builders.py), the parquet codec's
column types (parquet_codec.py), the export's column sets (kdgen.export) and the records tables
of docs/outputs.md (checked by tests/test_docs.py) all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Parquet types as the docs show them; parquet_codec maps each to a pyarrow type.
INT32_LIST, F16_LIST = "list<int32>", "list<float16>"
TOPK_IDS, TOPK_LPS = "list<list<int32>>", "list<list<float16>>"
TURNS = "list<struct<from: string, value: string>>"  # ShareGPT turns of a conversations record
MESSAGES = "list<struct<role: string, content: string>>"  # role/content turns (export)
JSON_TEXT = "JSON text"  # a small free-form dict, stored as one JSON string
IN_EXTRA = "in `_extra` (JSON text)"  # no column of its own: the codec's catch-all JSON column
IN_METADATA = "in `metadata`"  # a key of a conversations record's metadata, kept in its JSON text

LOGPROBS = "`LOGPROBS=k`"
PROMPT_LOGPROBS = "`PROMPT_LOGPROBS=true`"  # with LOGPROBS=k


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # the parquet type (see above)
    when: str  # the setting that adds the field ("" = every record of its kind)
    meaning: str
    in_metadata: bool = False  # conversations: a key of `metadata` (parquet: its own column if typed)


SAMPLING_MEANING = "`logprobs_mode`, `temperature`, `top_p`, `top_k`, `logprobs` (and `prompt_logprobs`)"
PROMPT_TOPK = "the same for every prompt position; row 0 is null / `[]`"

SEQUENCE_KD = (
    Field("parquet_file", "string", "", "URL of the input file"),
    Field("row_idx", "int64", "", "row in that file"),
    Field("prefix", "string", "", "prefix mode: the prompt's text; chat mode: the last user turn"),
    Field("generated", "string", "", "the completion's text, special tokens skipped, stripped (the MaxText "
                                     "generator's form)"),
    Field("prompt_token_ids", INT32_LIST, "", "the ids sent to the engine (BOS first with `ADD_BOS`)"),
    Field("completion_token_ids", INT32_LIST, "", "the ids generated (the stop token included when it ended "
                                                  "the text)"),
    Field("finish_reason", "string", "", "`stop` or `length`"),
    Field("sample_idx", "int32", "", "0..NUM_SAMPLES-1"),
    Field("token_logprobs", F16_LIST, LOGPROBS, "logprob of each generated token"),
    Field("top_token_ids", TOPK_IDS, LOGPROBS, "top-k ids of each generated position"),
    Field("top_logprobs", TOPK_LPS, LOGPROBS, "top-k logprobs of each generated position"),
    Field("prompt_token_logprobs", F16_LIST, PROMPT_LOGPROBS, PROMPT_TOPK),
    Field("prompt_top_token_ids", TOPK_IDS, PROMPT_LOGPROBS, PROMPT_TOPK),
    Field("prompt_top_logprobs", TOPK_LPS, PROMPT_LOGPROBS, PROMPT_TOPK),
    Field("sampling", JSON_TEXT, LOGPROBS, SAMPLING_MEANING),
    Field("reasoning", "string", "", "reasoning text of reasoning models (when there is one)"),
    Field("metadata", JSON_TEXT, "", "endpoint usage and latency (when there are any)"),
)

# Conversations records say `metadata.idx` where every other record says `row_idx`: trainers
# read that name, so it stays (row_key() and provenance() are the one place that knows).
CONVERSATIONS_ROW_KEY = "idx"
CONVERSATIONS = (  # the logprob fields are keys of metadata too; parquet gives them typed columns
    Field("id", "string", "", "`{stem}-{row}`: the input file's output name and the row"),
    Field("conversations", TURNS, "", "the turns sent (`human`, `gpt`, `system`, ...), then the completion "
                                      "as the last `gpt` turn"),
    Field("metadata", JSON_TEXT, "", "the keys below, and endpoint usage and latency"),
    Field("parquet_file", IN_METADATA, "", "URL of the input file", True),
    Field(CONVERSATIONS_ROW_KEY, IN_METADATA, "", "row in that file (`row_idx` of the other records)", True),
    Field("sample_idx", IN_METADATA, "", "0..NUM_SAMPLES-1", True),
    Field("finish_reason", IN_METADATA, "", "`stop` or `length`", True),
    Field("usage", IN_METADATA, "", "`{prompt_tokens, completion_tokens}`", True),
    Field("token_logprobs", F16_LIST, LOGPROBS, "logprob of each generated token", True),
    Field("top_token_ids", TOPK_IDS, LOGPROBS, "top-k ids of each generated position", True),
    Field("top_logprobs", TOPK_LPS, LOGPROBS, "top-k logprobs of each generated position", True),
    Field("prompt_token_logprobs", F16_LIST, PROMPT_LOGPROBS, PROMPT_TOPK, True),
    Field("prompt_top_token_ids", TOPK_IDS, PROMPT_LOGPROBS, PROMPT_TOPK, True),
    Field("prompt_top_logprobs", TOPK_LPS, PROMPT_LOGPROBS, PROMPT_TOPK, True),
    Field("prompt_token_ids", INT32_LIST, PROMPT_LOGPROBS, "the prompt ids the top-k rows belong to", True),
    Field("completion_token_ids", INT32_LIST, PROMPT_LOGPROBS, "the completion ids the top-k rows belong to",
          True),
    Field("sampling", IN_METADATA, LOGPROBS, SAMPLING_MEANING, True),
    Field("reasoning", IN_METADATA, "", "reasoning text of reasoning models (when there is one)", True),
    Field("error", IN_METADATA, "", "a failed row: why (the row keeps its line, with no completion)", True),
    Field("error_kind", IN_METADATA, "", "a failed row: its kind (`data`, `filtered`, `quarantined`)", True),
)

SCORE = (
    Field("parquet_file", "string", "", "URL of the input file"),
    Field("row_idx", "int64", "", "row in that file"),
    Field("token_ids", INT32_LIST, "", "the ids scored (BOS first with `ADD_BOS`)"),
    Field("token_logprobs", F16_LIST, "", "logprob of each token; null at each segment start"),
    Field("segment_starts", INT32_LIST, "", "where each segment starts (a text longer than `MAX_TARGET_LENGTH` "
                                            "is cut into segments scored alone)"),
    Field("top_token_ids", TOPK_IDS, LOGPROBS, "top-k ids of each position; `[]` at each segment start"),
    Field("top_logprobs", TOPK_LPS, LOGPROBS, "top-k logprobs of each position; `[]` at each segment start"),
    Field("next_top_token_ids", TOPK_IDS, LOGPROBS, "per segment j: the top-k ids after its last token"),
    Field("next_top_logprobs", TOPK_LPS, LOGPROBS, "per segment j: the top-k logprobs after its last token"),
    Field("completion_start", "int32", "", "scoring pairs (`COMPLETION_COLUMN`): first completion token"),
    Field("completion_end", "int32", "", "scoring pairs: end of the completion tokens"),
    Field("completion_logprob", "double", "", "scoring pairs: the completion's summed logprob"),
    Field("metadata", JSON_TEXT, "", "endpoint usage and latency (when there are any)"),
)

ERROR = (  # a failed row's line in a chunk object (conversations: the row's own line, above)
    Field("parquet_file", "string", "", "URL of the input file"),
    Field("row_idx", "int64", "", "row in that file"),
    Field("error", "string", "", "why the row failed"),
    Field("error_kind", IN_EXTRA, "", "`data`, `filtered` or `quarantined` (kdgen.prompts.DATA_ERROR_KINDS)"),
)

RECORDS = {"sequence_kd": SEQUENCE_KD, "conversations": CONVERSATIONS, "score": SCORE, "error": ERROR}
PROMPT_LOGPROB_KEYS = tuple(f.name for f in SEQUENCE_KD if f.when == PROMPT_LOGPROBS)
UNTYPED = (JSON_TEXT, IN_EXTRA, IN_METADATA)

# Export columns that are not record fields (kdgen.export: `--to messages`, `--to text`).
EXPORT_COLUMNS = {
    "messages": (("messages", MESSAGES), ("prompt", MESSAGES), ("completion", MESSAGES), ("id", "string"),
                 ("parquet_file", "string"), ("row_idx", "int64"), ("sample_idx", "int32")),
    "text": (("text", "string"), ("prompt", "string"), ("completion", "string"), ("parquet_file", "string"),
             ("row_idx", "int64"), ("sample_idx", "int32")),
}


def column_types() -> dict[str, str]:
    """{field: parquet type} of every field that has a typed column (one type per name)."""
    types: dict[str, str] = {}
    for fields in RECORDS.values():
        for f in fields:
            if f.type in UNTYPED:
                continue
            if types.setdefault(f.name, f.type) != f.type:
                raise AssertionError(f"record field {f.name!r} has two types: {types[f.name]}, {f.type}")
    return types


def json_fields() -> tuple[str, ...]:
    """Fields stored as JSON text (small free-form dicts)."""
    return tuple(dict.fromkeys(f.name for fields in RECORDS.values() for f in fields if f.type == JSON_TEXT))


def typed_metadata_fields() -> tuple[str, ...]:
    """Keys of a conversations record's metadata that parquet stores in typed columns."""
    return tuple(f.name for f in CONVERSATIONS if f.in_metadata and f.type not in UNTYPED)


def record_kind(task: str, output_format: str) -> str:
    return "score" if task == "score" else output_format


def columns(kind: str, logprobs: int = 0, prompt_logprobs: bool = False) -> list[str]:
    """The columns records of a kind can have with these settings (one schema for every export
    shard of a job), in the records' own order."""
    wanted = {"": True, LOGPROBS: logprobs > 0, PROMPT_LOGPROBS: logprobs > 0 and prompt_logprobs}
    return [f.name for f in RECORDS[kind] if wanted[f.when] and f.type not in (IN_EXTRA, IN_METADATA)]


# ---------------------------------------------------------------- where a record says its row

def provenance(r: dict) -> dict:
    """The dict that holds a record's parquet_file, row, sample and error: its metadata for a
    conversations record, the record itself otherwise."""
    meta = r.get("metadata")
    return meta if "conversations" in r and isinstance(meta, dict) else r


def row_key(r: dict) -> tuple[int, int]:
    """(row_idx, sample_idx) of a sequence_kd, score, conversations or error record."""
    if "row_idx" in r:
        return r["row_idx"], r.get("sample_idx", 0)
    meta = r["metadata"]
    return meta[CONVERSATIONS_ROW_KEY], meta.get("sample_idx", 0)


def row_of(r: dict, default=None):
    """The row of any record or error line; `default` if it says none."""
    if "row_idx" in r:
        return r["row_idx"]
    meta = r.get("metadata")
    return meta.get(CONVERSATIONS_ROW_KEY, default) if isinstance(meta, dict) else default


def is_inline_error(r: dict) -> bool:
    """A conversations record of a failed row (it keeps its line, with metadata.error)."""
    return "conversations" in r and "error" in (r.get("metadata") or {})


# ---------------------------------------------------------------- chat roles

# ShareGPT speakers (a conversations record's `from`) -> chat roles; the one table of role names.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
SPEAKERS = {role: speaker for speaker, role in SHAREGPT_ROLES.items()}  # chat role -> ShareGPT `from`
# Role names input rows may use, -> the chat template's roles (others are kept as they are).
ROLE_ALIASES = {**SHAREGPT_ROLES, "model": "assistant", "bot": "assistant"}


# ---------------------------------------------------------------- the docs' tables

def doc_table(kind: str) -> str:
    """The markdown table of a record kind, as docs/outputs.md shows it."""
    lines = ["| field | type (parquet) | setting | meaning |", "|---|---|---|---|"]
    for f in RECORDS[kind]:
        name = f"`metadata.{f.name}`" if f.in_metadata else f"`{f.name}`"
        lines.append(f"| {name} | {f.type} | {f.when or '–'} | {f.meaning} |")
    return "\n".join(lines)

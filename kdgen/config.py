"""One frozen JobConfig, built from CLI flags or environment variables, validated up front.

Every knob has one name: the dataclass field is the CLI flag (`--chunk_size`) and, upper-cased,
the environment variable (`CHUNK_SIZE`). Flags win over env vars, env vars over defaults.

Secret knobs (`secret_knob`, e.g. ENDPOINT_API_KEY) are marked in their field metadata, and that
is the only list of them: they are left out of repr() and of the fingerprint (so never in
_job.json), shown as *** by describe(), and their values are registered with kdgen.redact as soon
as a config holds them, so that no log line, error message or status output shows them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields

from kdgen import hostenv, redact

log = logging.getLogger(__name__)

class ConfigError(ValueError):
    """A bad flag or env var; the message names it."""


PROMPT_MODES = ("prefix", "chat")
OUTPUT_FORMATS = ("sequence_kd", "conversations")
FILE_FORMATS = ("jsonl", "parquet")  # of chunk objects (kdgen.records)
LOGPROBS_MODES = ("raw", "processed")
TASKS = ("generate", "score")
RANK_ENV = "KDGEN_DP_RANK"  # in each data-parallel rank's environment (kdgen.worker.parallel)
PRESETS = {
    # name: settings applied unless the user set them explicitly
    "magpie": {"prompt_mode": "chat", "prompt_column": "instruction", "output_format": "conversations"},
    "ultrachat": {"prompt_mode": "chat", "prompt_column": "prompt", "output_format": "conversations"},
}


def knob(default, help: str):
    return field(default=default, metadata={"help": help})


def secret_knob(default, help: str):
    """A credential: never in repr(), the fingerprint, _job.json or a log line (see redact.py)."""
    return field(default=default, repr=False, metadata={"help": help, "secret": True})


@dataclass(frozen=True)
class JobConfig:
    # What to read and where to write.
    model_path: str = knob("", "HF model directory (local or gs://) of the teacher. Required.")
    dataset_path: str = knob("", "Parquet input: a directory, a glob, or comma-separated files (local or gs://). Required.")
    output_path: str = knob("", "Output directory (local or gs://bucket/dir); the bash job also reads GCS_BUCKET_PATH. Required.")
    tokenizer_path: str = knob("", "Tokenizer directory if it differs from model_path.")
    # Prompting.
    prompt_mode: str = knob("prefix", "prefix: sequence KD on a token prefix of each row; chat: chat template.")
    text_column: str = knob("text", "Prefix mode: the text column.")
    prompt_column: str = knob("prompt", "Chat mode: a string column holding the user turn.")
    messages_column: str = knob("", "Chat mode: a list of {role, content} (or {from, value}) column; wins over prompt_column.")
    system_prompt: str = knob("", "Chat mode: a system prompt put before each conversation.")
    preset: str = knob("", "Dataset preset: magpie (prompt column `instruction`) or ultrachat (`prompt`); implies chat + conversations.")
    max_prefill_length: int = knob(1024, "Prefix mode: tokens kept from the start of each row.")
    max_target_length: int = knob(4096, "Prompt + completion budget: max_tokens = max_target_length - len(prompt).")
    max_tokens: int = knob(0, "If > 0, a fixed completion budget (still capped by max_target_length).")
    add_bos: bool = knob(False, "Prefix mode: prepend BOS (the MaxText generator did not).")
    output_format: str = knob("sequence_kd", "sequence_kd records, or conversations (ShareGPT style, chat mode).")
    output_file_format: str = knob("jsonl", "Chunk objects as jsonl (one JSON record per line) or parquet (typed columns; top-k ids int32, logprobs float16).")
    language_column: str = knob("", "Language filter: the column holding each row's language (with --language).")
    language: str = knob("", "Language filter: keep rows whose language_column equals this; others become error rows (reason: filtered) in the output. Env LANGUAGE counts only beside LANGUAGE_COLUMN (gettext uses it too).")
    task: str = knob("generate", "generate (completions) or score (prompt logprobs of given texts; `kdgen score`).")
    completion_column: str = knob("", "Scoring: score prompt/completion pairs; the prompt is text_column (prefix) or prompt/messages_column (chat).")
    # Sampling.
    temperature: float = knob(0.8, "Sampling temperature; 0 = greedy.")
    top_p: float = knob(1.0, "Nucleus sampling.")
    top_k: int = knob(0, "Top-k sampling; 0 = off.")
    num_samples: int = knob(1, "Completions per prompt (sample_idx 0..N-1).")
    stop: str = knob("", "Comma-separated stop strings.")
    logprobs: int = knob(0, "Top-k logprobs per generated token, for logit KD; 0 = off.")
    prompt_logprobs: bool = knob(False, "Generation with LOGPROBS=k: also keep the top-k of every prompt position (vLLM prompt_logprobs), so that records hold the teacher's top-k over prompt + completion and the job exports straight to maxtext-offline; needs LOGPROBS_MODE raw.")
    logprobs_mode: str = knob("raw", "raw: logprobs before temperature/top-p/top-k (what logit KD wants); processed: after them (vLLM logprobs_mode).")
    seed: int = knob(0, "Seed of the chunk shuffle and of the engine's sampling.")
    # Engine.
    tensor_parallel_size: int = knob(1, "vLLM tensor parallel size (chips per host).")
    pipeline_parallel_size: int = knob(1, "vLLM pipeline parallel size.")
    data_parallel_size: int = knob(1, "Engine processes per host, each on TP*PP devices; they split the work as virtual hosts.")
    dtype: str = knob("auto", "Engine dtype (auto, bfloat16, float16, float32).")
    max_model_len: int = knob(0, "Engine context length; 0 = the model's.")
    gpu_memory_utilization: float = knob(0.9, "Share of accelerator memory for vLLM (on CPU: of RAM).")
    enforce_eager: bool = knob(False, "Disable graph capture/compilation (faster start, slower steps).")
    gen_batch_size: int = knob(0, "Requests kept in flight in the engine across chunk boundaries; 0 = twice the engine's max_num_seqs.")
    fake_engine: str = knob("", "For tests and benchmarks only: run kdgen.engines.fake.FakeEngine instead of vLLM (deterministic pseudo-completions from MODEL_PATH's vocabulary, no model). `on`, or `;`-separated settings: `token_s=` seconds per generated token, `start_s=` seconds to start, `die_on=ID,ID,..` / `stall_on=..` a prompt holding these token ids kills / hangs the engine (kdgen/engines/fake.py). Outputs say so in _job.json.")
    # Endpoint mode: an already running OpenAI-compatible server instead of the in-process engine.
    endpoint: str = knob("", "Base URL of an OpenAI-compatible server (http://HOST:PORT/v1); empty = in-process vLLM.")
    endpoint_api: str = knob("completions", "Endpoint API: completions (token-id prompts, exact) or chat (chat/completions).")
    endpoint_api_key: str = secret_knob("", "Endpoint mode: API key, sent as `Authorization: Bearer` on every request; "
                                        "read from OPENAI_API_KEY when unset. Secret: shown as `***`, never "
                                        "written; prefer the env var (a flag is visible in ps).")
    concurrency: int = knob(64, "Endpoint mode: requests in flight to the server.")
    request_timeout_s: float = knob(600.0, "Endpoint mode: seconds before a request is retried.")
    max_retries: int = knob(10, "Endpoint mode: retries of a request (connection errors, timeouts, 5xx; exponential backoff 0.5 s..10 s) before the job stops.")
    # Work split.
    chunk_size: int = knob(1000, "Rows per chunk: the unit of claiming, output and resume.")
    host_index: int = knob(-1, "This host's index; -1 = from TPU_WORKER_ID / RANK, else 0.")
    host_id: str = knob("", "A name for this host that survives restarts and is unique in the fleet (leases are owned by HOST_ID:HOST_INDEX); default: /etc/machine-id, else the hostname.")
    num_hosts: int = knob(0, "Number of hosts; 0 = from TPU_WORKER_HOSTNAMES / WORLD_SIZE, else 1.")
    lease_ttl_s: float = knob(600.0, "Seconds a chunk lease lives without a heartbeat before others may take it.")
    tail_backups: bool = knob(True, "In the job's tail (every chunk left is leased by another host), an idle host generates a backup copy of one of them; the first copy stored wins and the slower holder drops its own. In-process engine only: an endpoint is shared, so a copy there would slow the holder down.")
    max_chunks: int = knob(0, "Stop after taking this many chunks (0 = all); for smoke runs.")
    limit: int = knob(0, "Use only the first LIMIT rows of the corpus (files in sorted order); 0 = all.")
    log_every_s: float = knob(10.0, "Seconds between progress lines (and host reports for `kdgen status`); on a terminal a live line instead.")
    # Storage and the corpus pin.
    storage_deadline_s: float = knob(300.0, "Seconds one storage operation may take, retries included, before the job stops (exit 1, finished chunks kept).")
    extend: bool = knob(False, "Add input files found under DATASET_PATH that the job file does not pin yet (new chunks; recorded in _job.json).")
    # Fleet faults (kdgen/fleet/partial.py; kdgen/worker/saves.py, loop.py, signals.py).
    checkpoint_every_s: float = knob(300.0, "Save the finished rows of a chunk to OUT/_partial/ once it has been in flight this long, and again after each further period, so a kill -9 loses at most about this much work of a chunk; 0 = only on SIGTERM and engine death.")
    preempt_grace_s: float = knob(20.0, "On SIGTERM: seconds to let in-flight requests finish and save their rows before exiting (spot/preemptible VMs get ~30 s).")
    engine_restarts: int = knob(3, "In-process engine restarts (backoff 2 s doubling) after an engine death before the job exits 1.")
    stall_timeout_s: float = knob(900.0, "Exit 1 (leases left to expire) if no request finished for this long while requests were in flight; 0 = off.")
    max_chunk_attempts: int = knob(3, "Attempts on a chunk before its never-finished rows are run in isolation; a row that then kills the engine alone becomes an error record.")
    strict_env: bool = knob(False, "An environment variable that looks like a misspelt knob (TEMPRATURE, NUM_SAMPLE) is an error (exit 2) instead of a warning.")

    def __post_init__(self):
        for name in SECRET_FIELDS:
            redact.register(getattr(self, name))
        creds = redact.url_credentials(self.endpoint) if self.endpoint else None
        if creds:  # https://user:password@host/v1 goes as HTTP basic auth: base64(user:password)
            redact.register_basic_auth(creds[0], creds[1])
        for f in fields(self):  # a password in any URL knob (DATASET_PATH, OUTPUT_PATH, ...)
            value = getattr(self, f.name)
            if isinstance(value, str) and "@" in value:
                for password in redact.url_passwords(value):
                    redact.register(password)

    def __repr__(self) -> str:  # what a traceback or a debug print shows: secrets masked
        return "JobConfig(" + ", ".join(f"{f.name}={shown_value(self, f.name)!r}" for f in fields(self)) + ")"

    # ---- derived ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> str:
        return self.tokenizer_path or self.model_path

    @property
    def stop_list(self) -> list[str]:
        return [s for s in self.stop.split(",") if s] if self.stop else []

    def fingerprint(self) -> dict:
        """Settings that change what a chunk's output contains; a resume must match them."""
        keys = (
            "model_path tokenizer dataset_path prompt_mode text_column prompt_column messages_column system_prompt "
            "max_prefill_length max_target_length max_tokens add_bos output_format temperature top_p "
            "top_k num_samples stop logprobs seed chunk_size limit"
        ).split()
        fp = {k: getattr(self, k) for k in keys}
        # The engine's numerics and context change the output too (job files before version 2
        # lack these keys: kdgen.corpus.jobfile records them on the first resume instead of comparing).
        fp["dtype"], fp["max_model_len"] = self.dtype, self.max_model_len
        if self.endpoint and self.endpoint_api != "completions":  # completions = the in-process prompts
            fp["endpoint_api"] = self.endpoint_api
        # Knobs added later enter the fingerprint only when set, so older outputs still resume.
        for k in ("language_column", "language", "task", "completion_column", "output_file_format", "logprobs_mode",
                  "prompt_logprobs"):
            if getattr(self, k) != JobConfig.__dataclass_fields__[k].default:
                fp[k] = getattr(self, k)
        if self.fake_engine:  # pseudo-completions never mix with a model's (faults and timing do not matter)
            fp["fake_engine"] = True
        return fp

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


FIELD_TYPES = {f.name: f.type for f in fields(JobConfig)}
SECRET_FIELDS = tuple(f.name for f in fields(JobConfig) if f.metadata.get("secret"))
# Secret knobs also read from a conventional variable when their own is not set.
ENV_FALLBACKS = {"endpoint_api_key": "OPENAI_API_KEY"}
# Knobs whose variable other software owns: LANGUAGE is gettext's (LANGUAGE=en_US:en on many
# systems), so it is read as the filter only beside the variable or flag of its column.
ENV_ONLY_WITH = {"language": "language_column"}


def parse_bool(value: str, source: str) -> bool:
    """The spellings of a bool, in a flag or an env var: 1/true/yes/on, 0/false/no/off or empty."""
    s = value.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{source} must be true or false, got {value!r}")


def _coerce(name: str, value, source: str):
    kind = FIELD_TYPES[name]
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else parse_bool(str(value), source)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if isinstance(value, (list, tuple)) and name == "stop":
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        shown = redact.MASK if name in SECRET_FIELDS else repr(value)
        raise ConfigError(f"{source} must be {kind}, got {shown}") from None


def _env_applies(name: str, flags: dict, env) -> bool:
    partner = ENV_ONLY_WITH.get(name)
    return partner is None or flags.get(partner) is not None or env.get(partner.upper()) not in (None, "")


def from_sources(flags: dict | None = None, env: dict | None = None) -> JobConfig:
    """Build a config from CLI flags (highest), environment variables, then defaults."""
    flags = dict(flags or {})
    env = os.environ if env is None else env
    unknown = sorted(set(flags) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown flag --{unknown[0]} (see `kdgen run --help`)")
    values, explicit = {}, set()
    for name in FIELD_TYPES:
        if name in flags and flags[name] is not None:
            values[name] = _coerce(name, flags[name], f"--{name}")
            explicit.add(name)
        elif env.get(name.upper()) not in (None, "") and _env_applies(name, flags, env):
            values[name] = _coerce(name, env[name.upper()], f"env {name.upper()}")
            explicit.add(name)
        elif env.get(ENV_FALLBACKS.get(name, "")) not in (None, ""):
            values[name] = _coerce(name, env[ENV_FALLBACKS[name]], f"env {ENV_FALLBACKS[name]}")
    preset = values.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
        for k, v in PRESETS[preset].items():
            if k not in explicit:
                values[k] = v
    values.setdefault("host_index", -1)
    values.setdefault("num_hosts", 0)
    if values["host_index"] < 0 or values["num_hosts"] <= 0:
        idx, n = hostenv.detect_host(env)
        if values["host_index"] < 0:
            values["host_index"] = idx
        if values["num_hosts"] <= 0:
            values["num_hosts"] = n
    near = near_miss_env(env)
    for var, knob_var in near:
        log.warning("env %s is not a kdgen knob and is ignored; did you mean %s?", var, knob_var)
    if near and values.get("strict_env"):
        var, knob_var = near[0]
        raise ConfigError(f"env {var} is not a kdgen knob (did you mean {knob_var}?); STRICT_ENV=1 refuses it")
    config = JobConfig(**values)
    validate(config)
    return config


def near_miss_env(env) -> list[tuple[str, str]]:
    """[(variable, knob variable it resembles)] for env vars that look like a misspelt knob."""
    return hostenv.near_misses(env, [n.upper() for n in FIELD_TYPES] + list(ENV_FALLBACKS.values()))


# Range checks as tables: (knob, lowest allowed value, what a value at the bound means or its unit).
AT_LEAST = (
    ("top_k", 0, " (0 = off)"), ("num_samples", 1, ""), ("logprobs", 0, ""), ("tensor_parallel_size", 1, ""),
    ("data_parallel_size", 1, ""), ("pipeline_parallel_size", 1, ""), ("gen_batch_size", 0, " (0 = auto)"),
    ("lease_ttl_s", 5, " seconds"), ("max_tokens", 0, " (0 = max_target_length - len(prompt))"),
    ("max_model_len", 0, " (0 = the model's)"), ("max_chunks", 0, " (0 = all)"), ("limit", 0, " (0 = all rows)"),
    ("log_every_s", 0, " seconds"), ("seed", 0, ""), ("concurrency", 1, ""), ("max_retries", 0, ""),
    ("checkpoint_every_s", 0, " (0 = off)"), ("preempt_grace_s", 0, ""), ("engine_restarts", 0, ""),
    ("stall_timeout_s", 0, " (0 = off)"), ("max_chunk_attempts", 1, ""), ("temperature", 0, ""),
)
ABOVE = (("chunk_size", 0, ""), ("max_prefill_length", 0, ""), ("max_target_length", 0, ""),
         ("request_timeout_s", 0, " seconds"), ("storage_deadline_s", 0, ""))
FRACTIONS = ("top_p", "gpu_memory_utilization")  # in (0, 1]
CHOICES = {"prompt_mode": PROMPT_MODES, "output_format": OUTPUT_FORMATS, "task": TASKS,
           "output_file_format": FILE_FORMATS, "logprobs_mode": LOGPROBS_MODES}
REQUIRED = {"model_path": "a HuggingFace model directory", "dataset_path": "parquet dir, glob or list",
            "output_path": "local dir or gs://bucket/dir"}


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(c: JobConfig) -> None:
    """Raise ConfigError, naming the knob, on the first bad setting: each knob alone, then combinations."""
    for f in fields(c):  # inf or nan in any float knob: no range check below can be trusted with it
        if FIELD_TYPES[f.name] == "float":
            need(math.isfinite(getattr(c, f.name)), f"--{f.name} ({f.name.upper()}) must be a finite number, "
                                                    f"got {getattr(c, f.name)}")
    for name, what in REQUIRED.items():
        need(bool(getattr(c, name)), f"{name.upper()} / --{name} is required ({what})")
    for name, choices in CHOICES.items():
        need(getattr(c, name) in choices, f"--{name} must be one of {choices}, got {getattr(c, name)!r}")
    need(c.endpoint_api in ("completions", "chat"), f"--endpoint_api must be completions or chat, got {c.endpoint_api!r}")
    need(  # before the ranges: a single bad MAX_TARGET_LENGTH is named by this, its more telling message
        c.task == "score" or c.max_target_length > c.max_prefill_length or c.max_tokens > 0,  # scoring has no prefill
        f"--max_target_length ({c.max_target_length}) must exceed --max_prefill_length "
        f"({c.max_prefill_length}): completions get max_target_length - len(prefix) tokens",
    )
    for table, op in ((ABOVE, ">"), (AT_LEAST, ">=")):
        for name, bound, note in table:
            value = getattr(c, name)
            need(value > bound if op == ">" else value >= bound, f"--{name} must be {op} {bound}{note}, got {value}")
    for name in FRACTIONS:
        need(0 < getattr(c, name) <= 1, f"--{name} must be in (0, 1], got {getattr(c, name)}")
    need(0 <= c.host_index < c.num_hosts, f"--host_index {c.host_index} must be in [0, --num_hosts={c.num_hosts})")
    validate_combinations(c)


def validate_combinations(c: JobConfig) -> None:
    """The rules between knobs (each knob alone is in range)."""
    need(not (c.endpoint and c.data_parallel_size > 1),
         "--data_parallel_size > 1 starts in-process engines; with --endpoint use --concurrency instead")
    need(not (c.endpoint and c.fake_engine), "--fake_engine (tests and benchmarks) and --endpoint exclude each other")
    need(not c.endpoint or c.endpoint.startswith(("http://", "https://")),
         f"--endpoint must be an http(s) URL like http://HOST:PORT/v1, got {redact.redact(repr(c.endpoint))}")
    need(not any(ch.isspace() or not ch.isprintable() for ch in c.endpoint_api_key),
         "ENDPOINT_API_KEY / --endpoint_api_key holds whitespace or a control character (a newline "
         "from a key file?): give the key alone")
    need(bool(c.language_column) == bool(c.language),
         "--language_column and --language go together (the column to read, the language to keep)")
    need(c.num_samples == 1 or c.temperature > 0,
         f"--num_samples {c.num_samples} needs --temperature > 0 (greedy samples are all the same)")
    if c.task == "score":
        need(c.num_samples == 1, "scoring (--task score) gives one record per row: --num_samples must be 1")
        need(c.output_format == "sequence_kd", "scoring writes its own records: leave --output_format at sequence_kd")
        need(c.logprobs_mode == "raw",
             "scoring gives prompt logprobs, which vLLM does not temperature-process: leave --logprobs_mode at raw")
        need(c.prompt_mode == "prefix" or bool(c.completion_column),
             "scoring in chat mode scores a completion after the templated prompt: set --completion_column")
    else:
        need(not c.completion_column, "--completion_column is for scoring (kdgen score / --task score)")
    if c.prompt_logprobs:
        need(c.task == "generate", "--prompt_logprobs is for generation (scoring always gives the prompt's top-k)")
        need(c.logprobs > 0, "--prompt_logprobs needs --logprobs k > 0 (the top-k to keep per position)")
        need(c.logprobs_mode == "raw", "--prompt_logprobs needs --logprobs_mode raw (vLLM's prompt logprobs are "
             "raw: completion top-k after temperature would not match them)")
        need(not (c.endpoint and c.endpoint_api == "chat"),
             "--prompt_logprobs through an endpoint needs --endpoint_api completions (vLLM's prompt_logprobs)")
    need(c.output_format != "conversations" or c.prompt_mode == "chat",
         "--output_format conversations needs --prompt_mode chat (or a --preset)")


def replace(c: JobConfig, **changes) -> JobConfig:
    new = dataclasses.replace(c, **changes)
    validate(new)
    return new


def flag_table() -> str:
    """The README's flag/env-var table, generated from the fields above."""
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    for f in fields(JobConfig):
        rows.append(f"| `--{f.name}` | `{f.name.upper()}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)


def shown_value(c: JobConfig, name: str):
    """A knob's value as logs may show it: *** for a set secret, credentials in URLs masked."""
    value = getattr(c, name)
    if name in SECRET_FIELDS:
        return redact.MASK if value else value
    return redact.redact(value) if isinstance(value, str) else value


def describe(c: JobConfig, width: int = 110) -> str:
    """Every knob as `NAME=value`, in one compact block for logs: those set first, then defaults."""
    lines = []
    for title, want_default in (("set:     ", False), ("defaults:", True)):
        pairs = [f"{f.name.upper()}={shown_value(c, f.name)!r}" for f in fields(c)
                 if (getattr(c, f.name) == f.default) == want_default]
        line = f"  {title}"
        for pair in pairs:
            if len(line) + 1 + len(pair) > width and line.strip() != title.strip():
                lines.append(line)
                line = " " * (len(title) + 2)
            line += " " + pair
        if pairs:
            lines.append(line)
    return "\n".join(lines)


"""Start-up checks of the settings against the storage locations, the model and its tokenizer.

They run before OUT/_job.json is pinned and before any engine starts, so that a wrong path, a
missing bucket, a tokenizer of another model or a LOGPROBS the model cannot give is refused with
one line naming the knob (exit 2), instead of pinning the output to settings that cannot work.
"""

from __future__ import annotations

import json
import logging
import os

from kdgen import storage
from kdgen.config import ConfigError, JobConfig

log = logging.getLogger(__name__)


def check_locations(c: JobConfig) -> None:
    """Every path knob has a supported URL scheme, and every gs:// bucket exists."""
    knobs = [("OUTPUT_PATH", c.output_path)]
    knobs += [("DATASET_PATH", p.strip()) for p in c.dataset_path.split(",") if p.strip()]
    if not c.endpoint:  # an endpoint's MODEL_PATH names the served model, not a directory
        knobs.append(("MODEL_PATH", c.model_path))
    if c.tokenizer_path:
        knobs.append(("TOKENIZER_PATH", c.tokenizer_path))
    for knob, url in knobs:
        if url and url != "-":
            storage.check_location(url, knob)


def check(c: JobConfig, has_engine: bool = False, has_tokenizer: bool = False):
    """All start-up checks of a `run`: storage; the model (unless the caller brought its own
    engine: tests, the Python API, benchmarks; or an endpoint serves it) and LOGPROBS against it;
    the tokenizer (unless the caller brought one), and that it fits the model. Returns the
    tokenizer it loaded (None if the caller brought one), for the job to use."""
    check_locations(c)
    from kdgen.engines.vllm_engine import check_model_dir, localize_model
    from kdgen.prompts import load_tokenizer

    model_config = None
    if not has_engine and not c.endpoint:
        local = localize_model(c.model_path)
        check_model_dir(local, c.model_path)
        model_config = read_model_config(local, c.model_path)
        check_logprobs(c, model_config)
    if has_tokenizer:
        return None
    knob = "TOKENIZER_PATH" if c.tokenizer_path else "MODEL_PATH"
    try:
        tok = load_tokenizer(localize_model(c.tokenizer))
    except ValueError as e:
        raise ConfigError(f"{knob} {c.tokenizer!r} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    if model_config is not None:
        check_tokenizer_fits(tok, model_config, knob, c.tokenizer)
    return tok


def read_model_config(local: str, given: str) -> dict:
    path = os.path.join(local, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"MODEL_PATH {given!r}: config.json is unreadable ({e})") from None
    gen = os.path.join(local, "generation_config.json")
    if os.path.exists(gen):  # the eos ids a model stops on may be listed here only
        try:
            with open(gen) as f:
                g = json.load(f)
            cfg = {**cfg, "_generation": g if isinstance(g, dict) else {}}
        except (OSError, ValueError):
            pass
    return cfg


def vocab_size(model_config: dict) -> int | None:
    """The model's vocabulary size (multimodal configs keep it in text_config)."""
    for cfg in (model_config, model_config.get("text_config") or {}):
        v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def _ids(value) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def check_tokenizer_fits(tok, model_config: dict, knob: str, given: str) -> None:
    """The tokenizer must be the model's: no id beyond the model's vocabulary, and the special
    tokens the model config names (bos, eos, pad) are the tokenizer's."""
    v = vocab_size(model_config)
    if v is not None and len(tok) > v:
        raise ConfigError(f"{knob} {given!r}: the tokenizer has {len(tok)} tokens but the model's config.json "
                          f"says vocab_size {v}: it is not this model's tokenizer")
    gen = model_config.get("_generation") or {}
    for name in ("bos", "eos", "pad"):
        want = _ids(model_config.get(f"{name}_token_id")) | _ids(gen.get(f"{name}_token_id"))
        have = getattr(tok, f"{name}_token_id", None)
        if want and isinstance(have, int) and have not in want:
            raise ConfigError(f"{knob} {given!r}: the tokenizer's {name} token is id {have} but the model's "
                              f"config.json says {name}_token_id {sorted(want)}: it is not this model's tokenizer")


def check_logprobs(c: JobConfig, model_config: dict) -> None:
    """Top-LOGPROBS per position cannot exceed the vocabulary (vLLM's top-k fails on every step)."""
    v = vocab_size(model_config)
    if c.logprobs and v is not None and c.logprobs > v:
        raise ConfigError(f"LOGPROBS / --logprobs {c.logprobs} exceeds the model's vocabulary ({v} tokens, "
                          f"config.json vocab_size of MODEL_PATH)")
    from kdgen.engines.vllm_engine import engine_logprobs_kwargs

    cap = engine_logprobs_kwargs(c)["max_logprobs"]
    if c.logprobs > cap:  # the in-process engine is started with this cap
        raise ConfigError(f"LOGPROBS / --logprobs {c.logprobs} exceeds the engine's max_logprobs ({cap})")

"""vLLM's compile cache: one directory per engine rank, and a way out of a corrupt one.

vLLM keeps torch.compile / Inductor artifacts under VLLM_CACHE_ROOT/torch_compile_cache. Engines
that compile the same model into the same directory at once (the DATA_PARALLEL_SIZE ranks of one
host), or a kill during compilation, can leave a truncated artifact there; every later start then
fails (e.g. `ImportError: ...main.so: file too short`, or a worker that dies loading it). So:
  * each engine process compiles into its own VLLM_CACHE_ROOT, KDGEN_CACHE/vllm/dp<rank> (a user's
    VLLM_CACHE_ROOT is kept, with /dp<rank> added for data-parallel ranks: see kdgen.worker.parallel);
  * a start that fails while a compile cache is in place moves that cache aside and starts once
    more (it recompiles), saying so in one line. No attempt is made to tell a corrupt artifact
    from a sound one (a truncated one need not be named by the error): the cache only saves
    time, so moving it aside is always safe and costs one compilation, never a row.
Its artifacts are loaded as code, so it lives in a private directory (`private_dir`): the kdgen
cache defaults to $XDG_CACHE_HOME/kdgen (else ~/.cache/kdgen), created 0700; a cache directory
owned by another user or writable by group/others is refused.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

RANK_ENV = "KDGEN_DP_RANK"  # set by kdgen.worker.parallel for each data-parallel rank


def kdgen_cache() -> str:
    """KDGEN_CACHE, else $XDG_CACHE_HOME/kdgen, else ~/.cache/kdgen (per user, never a shared /tmp
    path another user could create first). Check it with private_dir before use."""
    if os.environ.get("KDGEN_CACHE"):
        return os.environ["KDGEN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdgen")


def private_dir(path: str, knob: str = "KDGEN_CACHE") -> str:
    """`path`, created 0700 if missing; a settings error if it belongs to another user or others
    may write to it (what is cached there is loaded as a model or as code)."""
    from kdgen.config import ConfigError

    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{knob}: cannot create the cache directory {path}: {e.strerror or e}") from None
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{knob}: the cache directory {path} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.geteuid()}): set {knob} to a directory of your own")
    if st.st_mode & 0o022:
        raise ConfigError(f"{knob}: the cache directory {path} is writable by other users (mode "
                          f"{st.st_mode & 0o777:o}): chmod go-w it, or set {knob} to a private directory")
    return path


def use_rank_cache() -> str:
    """VLLM_CACHE_ROOT for this process (set in os.environ before vLLM starts, so the engine's
    processes inherit it), checked private; returns it."""
    root = os.environ.get("VLLM_CACHE_ROOT")
    if root:
        return private_dir(root, "VLLM_CACHE_ROOT")
    private_dir(kdgen_cache())
    root = private_dir(os.path.join(kdgen_cache(), "vllm", f"dp{os.environ.get(RANK_ENV, '0')}"))
    os.environ["VLLM_CACHE_ROOT"] = root
    return root


def compile_dir(root: str) -> str:
    return os.path.join(root, "torch_compile_cache")


def move_aside(root: str) -> str | None:
    """Rename root's compile cache to <dir>.corrupt-<unix time>; returns the new name, or None if
    there is no cache (or an empty one) to move."""
    cdir = compile_dir(root)
    try:
        if not os.listdir(cdir):
            return None
    except FileNotFoundError:
        return None
    dest = f"{cdir}.corrupt-{time.time_ns()}"
    os.rename(cdir, dest)
    return dest

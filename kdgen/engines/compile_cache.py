"""vLLM's compile cache: one private directory per engine rank, and a way out of a corrupt one.

Each engine process compiles into its own VLLM_CACHE_ROOT, KDGEN_CACHE/vllm/dp<rank> (a user's
VLLM_CACHE_ROOT is kept, with /dp<rank> added per data-parallel rank: kdgen.worker.parallel), so
ranks never write the same artifacts. A start that fails with a compile cache in place moves it
aside (move_aside) and starts once more: telling a corrupt artifact from a sound one is not tried,
as the cache only saves time. Its artifacts are loaded as code, so the cache lives in a private
directory (private_dir: 0700, owned by this user). See docs/operations.md ("Compile caches").
"""

from __future__ import annotations

import logging
import os
import time

from kdgen.config import RANK_ENV  # one compile cache per data-parallel rank

log = logging.getLogger(__name__)


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

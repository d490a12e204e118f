"""vLLM's compile cache: one directory per engine rank, and a way out of a corrupt one.

vLLM keeps torch.compile / Inductor artifacts under VLLM_CACHE_ROOT/torch_compile_cache. Engines
that compile the same model into the same directory at once (the DATA_PARALLEL_SIZE ranks of one
host), or a kill during compilation, can leave a truncated artifact there; every later start then
fails (e.g. `ImportError: ...main.so: file too short`, or a worker that dies loading it). So:
  * each engine process compiles into its own VLLM_CACHE_ROOT, KDGEN_CACHE/vllm/dp<rank> (a user's
    VLLM_CACHE_ROOT is kept, with /dp<rank> added for data-parallel ranks: see kdgen.worker.parallel);
  * a start that fails while the cache holds a broken artifact, or whose error names a path in it,
    moves the compile cache aside and starts once more (it recompiles), saying so in one line.
The cache only saves time: moving it aside costs one compilation, never a row.
Its artifacts are loaded as code, so it lives in a private directory (`private_dir`): the kdgen
cache defaults to $XDG_CACHE_HOME/kdgen (else ~/.cache/kdgen), created 0700; a cache directory
owned by another user or writable by group/others is refused.
"""

from __future__ import annotations

import logging
import os
import struct
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


def broken_elf(path: str) -> str | None:
    """Why a shared object cannot load (shorter than its headers or segments say), or None."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return f"{size} bytes, not a whole ELF header"
        is64, end = head[4] == 2, "<" if head[5] == 1 else ">"
        if is64:
            phoff, shoff = struct.unpack_from(end + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 54)
        else:
            phoff, shoff = struct.unpack_from(end + "II", head, 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", head, 42)
        if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
            return f"truncated: {size} bytes, its headers need more"
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    for i in range(phnum):
        entry = table[i * phentsize:(i + 1) * phentsize]
        if is64:
            offset, filesz = struct.unpack_from(end + "Q", entry, 8)[0], struct.unpack_from(end + "Q", entry, 32)[0]
        else:
            offset, filesz = struct.unpack_from(end + "I", entry, 4)[0], struct.unpack_from(end + "I", entry, 16)[0]
        if offset + filesz > size:
            return f"truncated: {size} bytes, a segment ends at byte {offset + filesz}"
    return None


def find_broken(root: str, error_text: str = "") -> tuple[str, str] | None:
    """(path, why) of the first artifact in root's compile cache that cannot load: a shared object
    cut short, generated Python that does not compile, or a path the start error names."""
    cdir = compile_dir(root)
    if not os.path.isdir(cdir):
        return None
    if cdir in error_text:
        at = error_text.index(cdir)
        return error_text[at:].split()[0].rstrip(":'\",)"), "named by the start error"
    for dirpath, _, files in os.walk(cdir):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            try:
                if name.endswith(".so"):
                    why = broken_elf(path)
                elif name.endswith(".py"):
                    with open(path, "rb") as f:
                        compile(f.read(), path, "exec")
                    why = None
                else:
                    continue
            except (SyntaxError, ValueError) as e:
                why = f"does not compile ({type(e).__name__})"
            except OSError as e:
                why = f"unreadable ({e.strerror or e})"
            if why:
                return path, why
    return None


def move_aside(root: str) -> str:
    """Rename root's compile cache to <dir>.corrupt-<unix time>; returns the new name."""
    cdir = compile_dir(root)
    dest = f"{cdir}.corrupt-{int(time.time())}"
    os.rename(cdir, dest)
    return dest

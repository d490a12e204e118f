"""vLLM's compile cache: one directory per engine rank, and a way out of a corrupt one.

vLLM keeps torch.compile / Inductor artifacts under VLLM_CACHE_ROOT/torch_compile_cache. Engines
that compile the same model into the same directory at once (the DATA_PARALLEL_SIZE ranks of one
host), or a kill during compilation, can leave a truncated artifact there; every later start then
fails (e.g. `ImportError: ...main.so: file too short`, or a worker that dies loading it). So:
  * each engine process compiles into its own VLLM_CACHE_ROOT, KDGEN_CACHE/vllm/dp<rank> (a user's
    VLLM_CACHE_ROOT is kept, with /dp<rank> added for data-parallel ranks: see kdgen.parallel);
  * a start that fails while the cache holds a broken artifact, or whose error names a path in it,
    moves the compile cache aside and starts once more (it recompiles), saying so in one line.
The cache only saves time: moving it aside costs one compilation, never a row.
"""

from __future__ import annotations

import logging
import os
import struct
import time

log = logging.getLogger(__name__)

RANK_ENV = "KDGEN_DP_RANK"  # set by kdgen.parallel for each data-parallel rank


def kdgen_cache() -> str:
    return os.environ.get("KDGEN_CACHE", "/tmp/kdgen-cache")


def use_rank_cache() -> str:
    """VLLM_CACHE_ROOT for this process (set in os.environ before vLLM starts, so the engine's
    processes inherit it); returns it."""
    root = os.environ.get("VLLM_CACHE_ROOT")
    if not root:
        root = os.path.join(kdgen_cache(), "vllm", f"dp{os.environ.get(RANK_ENV, '0')}")
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

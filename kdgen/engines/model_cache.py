"""Local copies of gs:// models and tokenizers (vLLM loads from local disk), in the private kdgen cache.

A copy lives in KDGEN_CACHE/models/<key>: the key hashes the source URL and every source object's
name, size and generation (GCS gives each upload a new generation, so a model re-uploaded under the
same name is fetched again). A copy is made in a new temporary directory beside it; its manifest
(each file's size, mtime and sha256, checked against the source listing) is written last, then the
directory is renamed into place. Each use checks the files' names, sizes and mtimes against the
manifest (hashing a 70B teacher, ~140 GB, at every start would cost minutes; the directory is
private, so what changes a file changes its mtime); a copy that does not match is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from kdgen import storage
from kdgen.engines import compile_cache
from kdgen.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = ".kdgen_manifest.json"


def localize(url: str) -> str:
    """The verified local copy of the gs:// directory `url`, fetched if missing or damaged."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    sources = source_objects(fs, root)
    if not sources:
        raise ConfigError(f"{url}: no files there (MODEL_PATH / TOKENIZER_PATH must be a model directory)")
    key = hashlib.sha256(json.dumps([url.rstrip("/"), sources]).encode()).hexdigest()[:20]
    cache = compile_cache.private_dir(os.path.join(compile_cache.private_dir(compile_cache.kdgen_cache()), "models"))
    local = os.path.join(cache, key)
    if os.path.isdir(local):
        why = damage(local)
        if why is None:
            return local
        log.warning("the cached copy %s of %s %s: fetching it again", local, url, why)
        shutil.rmtree(local)
    tmp = tempfile.mkdtemp(prefix=key + ".tmp-", dir=cache)
    try:
        log.info("copying %s to %s", url, local)
        fs.get(root + "/", tmp + "/", recursive=True)
        write_manifest(tmp, {name: size for name, size, _ in sources}, url)
        os.rename(tmp, local)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(local) and damage(local) is None:  # another process of this host won the race
            return local
        raise
    return local


def source_objects(fs, root: str) -> list[tuple[str, int, str]]:
    """(relative name, size, version) of every object under root; version: the generation, else a
    checksum the store gives."""
    out = []
    for name, info in fs.find(root, detail=True).items():
        if name.endswith("/"):  # a "folder" placeholder object: nothing to copy
            continue
        version = next((str(info[k]) for k in ("generation", "md5Hash", "crc32c", "etag", "mtime") if info.get(k)), "")
        out.append((name[len(root):].lstrip("/"), int(info.get("size") or 0), version))
    return sorted(out)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def local_files(local: str) -> list[str]:
    names = []
    for d, _, files in os.walk(local):
        names += [os.path.relpath(os.path.join(d, n), local) for n in files]
    return sorted(n for n in names if n != MANIFEST)


def write_manifest(local: str, sizes: dict[str, int], url: str) -> None:
    """Check the fetched files against the source listing, then record their sizes and hashes."""
    names = local_files(local)
    if names != sorted(sizes):
        raise OSError(f"copy of {url} is incomplete: {sorted(set(sizes) - set(names))[:5]} missing")
    files = {}
    for n in names:
        size = os.path.getsize(os.path.join(local, n))
        if size != sizes[n]:
            raise OSError(f"copy of {url}: {n} has {size} bytes, the source {sizes[n]}")
        files[n] = [size, os.stat(os.path.join(local, n)).st_mtime_ns, file_sha256(os.path.join(local, n))]
    with open(os.path.join(local, MANIFEST), "w") as f:
        json.dump({"source": url, "files": files}, f)


def damage(local: str) -> str | None:
    """Why the copy in `local` cannot be used (no manifest, a file missing, added, resized or
    written since it was fetched), or None."""
    try:
        with open(os.path.join(local, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "has no readable manifest"
    names = local_files(local)
    if names != sorted(files):
        return f"does not hold the files of its manifest ({sorted(set(files) ^ set(names))[:3]})"
    for n in names:
        path = os.path.join(local, n)
        st = os.stat(path)
        if [st.st_size, st.st_mtime_ns] != files[n][:2]:
            return f"has a changed {n}"
    return None

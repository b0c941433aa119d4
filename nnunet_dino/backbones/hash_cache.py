"""SHA-256 of weight files, computed once and re-checked cheaply on every load.

A 27 GB file takes a minute to hash, so the result is cached, one small JSON file per weights file (concurrent runs
never overwrite each other's entries). The cache key is what a user cannot set back: device, inode, size,
mtime and ctime (``touch -r`` restores mtime, not ctime; replacing a file changes its inode or ctime). On top,
every load re-reads a constant 1 MiB sample of the file (16 blocks spread over it) and compares it to the sample
taken when the file was hashed, so even an in-place rewrite that kept every stat field is caught.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.files import atomic_write_text, sha256_of_file

logger = logging.getLogger(__name__)

_SAMPLE_BLOCKS = 16
_SAMPLE_SIZE = 64 << 10
_FORMAT = 2


def cache_folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nnunet_dino" / "verified"


def _entry_file(path: Path) -> Path:
    return cache_folder() / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")


def _identity(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def sample_digest(path: str | os.PathLike, size: int | None = None) -> str:
    """SHA-256 over 16 blocks of 64 KiB spread evenly over the file (the whole file when smaller): ~1 ms."""
    size = os.path.getsize(path) if size is None else size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_SIZE:
            digest.update(f.read())
        else:
            step = (size - _SAMPLE_SIZE) // (_SAMPLE_BLOCKS - 1)
            for i in range(_SAMPLE_BLOCKS):
                f.seek(i * step)
                digest.update(f.read(_SAMPLE_SIZE))
    return digest.hexdigest()


def _read_entry(path: Path) -> dict | None:
    try:
        entry = json.loads(_entry_file(path).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == _FORMAT else None


def _write_entry(path: Path, entry: dict) -> None:
    target = _entry_file(path)
    try:
        atomic_write_text(target, json.dumps(entry))  # atomic: never a half-written entry
    except (OSError, DinoUNetError) as e:  # a read-only home only costs a re-hash next time
        logger.debug("could not write hash cache %s: %s", target, e)


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The remembered SHA-256 if the file is provably the one that was hashed (stat key and sample), else None."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    entry = _read_entry(path)
    if not entry or entry.get("identity") != _identity(st):
        return None
    if entry.get("sample") != sample_digest(path, st.st_size):
        return None
    return entry["sha256"]


def file_sha256(path: str | os.PathLike, use_cache: bool = True) -> str:
    """Full SHA-256 of a file; remembered (see the module docstring) so big files are hashed once."""
    path = Path(path)
    if use_cache:
        sha = cached_sha256(path)
        if sha:
            return sha
    st = path.stat()
    if st.st_size > 1 << 30:
        logger.info("hashing %s (%.1f GB) once; the result is cached", path.name, st.st_size / 2**30)
    sha = sha256_of_file(path)
    if use_cache:
        _write_entry(path, {"format": _FORMAT, "path": str(path.resolve()), "identity": _identity(st),
                            "sample": sample_digest(path, st.st_size), "sha256": sha})
    return sha

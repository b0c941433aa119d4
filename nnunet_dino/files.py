"""Writing files safely: atomically, with the user's usual permissions, and only where a command may write.

The rule for every command that writes (stated once in the README): a target that does not exist is created; one
that exists is used only if it is empty or holds this command's own earlier output -- recorded in a small manifest
file the command writes last -- and then only the entries that manifest lists are replaced. Anything else is refused
with one line naming ``--force`` or another path. A command never deletes a file it did not write.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from nnunet_dino.errors import DinoUNetError

MANIFEST = ".nnunet-dino-output.json"
T = TypeVar("T")


def default_file_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` (or ``mkdir``) would give under the current umask (tempfile uses 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def is_no_space(error: BaseException) -> bool:
    """A full disk, as Python (ENOSPC) or torch's C++ writer ("iostream error", "No space") reports it."""
    text = str(error)
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text \
        or "iostream" in text


class NoSpaceError(DinoUNetError):
    """A full disk (an OutputFolder re-raises it naming its own folder rather than its staging folder)."""


def no_space_error(folder: Path, needed_bytes: int | None = None) -> NoSpaceError:
    """The one message for a full disk: the folder and the space the write needs."""
    need = f" (this needs about {needed_bytes / 2**20:.0f} MB free)" if needed_bytes else ""
    return NoSpaceError(f"No space left on the device of {folder}{need}; nothing was written there -- free space "
                         f"or choose another folder.")


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse before writing when the disk cannot hold ``needed_bytes`` (a C++ writer may abort, not raise)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if shutil.disk_usage(probe).free < needed_bytes:
        raise no_space_error(folder, needed_bytes)


def read_json_object(path: Path) -> dict | None:
    """A JSON object from a file, or None when the file is missing, unreadable or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def atomic_write(path: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place with the user's usual
    permissions. A failure leaves the previous file (if any) and no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        return result
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)) and is_no_space(e):
            raise no_space_error(path.parent) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(data: object, path: Path) -> None:
    """JSON via a temporary file + rename: never a half-written plans or summary file."""
    atomic_write_text(path, json.dumps(data, indent=4, sort_keys=False))


STAGE_PREFIX = ".partial-"
STAGE_MARKER = ".nnunet-dino-stage"  # inside every staging folder: debris a killed run left is recognisably ours


def sha256_of_file(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (the one streaming hash: output manifests and weight files use it)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> dict | None:
    """What an entry we wrote looks like, to recognise it later: a file's size and SHA-256; a folder's files (relative
    paths) with theirs. None for anything else (a link, a FIFO, a device)."""
    if path.is_symlink():
        return None
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": sha256_of_file(path)}
    if path.is_dir():
        files = {}
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.is_symlink():
                files[f.relative_to(path).as_posix()] = fingerprint(f)
        return {"files": files}
    return None


def _matches(path: Path, record: object) -> bool:
    """``path`` is still exactly the file ``record`` describes (a regular file, same size, same hash)."""
    if not isinstance(record, dict) or path.is_symlink() or not path.is_file():
        return False
    try:
        return path.stat().st_size == record.get("size") and sha256_of_file(path) == record.get("sha256")
    except OSError:
        return False


def remove_ours(path: Path, record: object) -> bool:
    """Remove what we wrote at ``path`` and nothing else: a file only if it still matches its record; from a folder,
    the recorded files that still match, then the folders left empty. True when nothing is left at ``path``."""
    if not isinstance(record, dict):
        return not (path.exists() or path.is_symlink())
    if "files" not in record:
        if _matches(path, record):
            path.unlink()
        return not (path.exists() or path.is_symlink())
    if path.is_symlink() or not path.is_dir():
        return not (path.exists() or path.is_symlink())
    files = record.get("files") if isinstance(record.get("files"), dict) else {}
    for rel, rec in files.items():
        target = path / rel
        if _plain_relative(rel) and _matches(target, rec):
            target.unlink()
    for sub in sorted((d for d in path.rglob("*") if d.is_dir() and not d.is_symlink()), key=lambda d: -len(d.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(path.iterdir()):
        path.rmdir()
        return True
    return False


def _plain_relative(rel: object) -> bool:
    return isinstance(rel, str) and "\0" not in rel and not rel.startswith("/") and ".." not in rel.split("/")


def _is_stage_debris(path: Path) -> bool:
    """A staging folder a killed run of ours left behind (named and marked by OutputFolder.write)."""
    return path.name.startswith(STAGE_PREFIX) and path.is_dir() and not path.is_symlink() \
        and (path / STAGE_MARKER).is_file()


class OutputFolder:
    """A folder a command writes into under the rule above: checked on construction, created only when written.

    The manifest records each entry with its fingerprint (``fingerprint``): an entry is ours to replace or remove
    only while it still matches, so a name listed by hand, or a file changed since, is never deleted."""

    def __init__(self, path: Path, command: str, force: bool = False, option: str = "-o"):
        self.path, self.command = Path(path).expanduser().absolute(), command
        self.created = False
        self.force = force
        self.entries: dict[str, dict | None] = {}
        if self.path.exists() and not self.path.is_dir():
            raise DinoUNetError(f"{option} {path} is a file; {command} writes a folder -- pass a new or empty folder.")
        self.option = option
        if not self.path.exists():
            return
        for debris in [p for p in self.path.iterdir() if _is_stage_debris(p)]:
            shutil.rmtree(debris, ignore_errors=True)  # a run killed mid-write: our own staging folder
        manifest = self.read_manifest(self.path)
        if manifest is not None and manifest.get("written_by") == command:
            entries = manifest.get("entries")
            self.entries = {n: r for n, r in entries.items() if _plain_name(n)} if isinstance(entries, dict) else {}
            return
        if any(self.path.iterdir()) and not force:
            raise DinoUNetError(f"{self.path} is not empty and holds no earlier output of {command}; pass a new or "
                                f"empty folder with {option}, or add --force to write into it (entries of the same "
                                f"name are replaced, nothing else is touched).")

    @property
    def previous(self) -> list[str]:
        return sorted(self.entries)

    @staticmethod
    def read_manifest(folder: Path) -> dict | None:
        return read_json_object(folder / MANIFEST)

    def owns(self, name: str) -> bool:
        return name in self.entries

    def _create(self) -> None:
        if self.path.is_dir():
            return
        try:
            self.path.mkdir(parents=True)
        except OSError as e:
            raise DinoUNetError(f"Cannot create {self.path} ({e.strerror}); pass a writable {self.option}.") from None
        self.created = True

    def _write_manifest(self) -> None:
        atomic_write_json({"written_by": self.command, "files": self.previous, "entries": self.entries},
                          self.path / MANIFEST)

    def claim(self, *names: str) -> Path:
        """Create the folder now and record ``names`` as ours before another program (nnU-Net) writes them; a name
        already there that is not ours is refused (without --force)."""
        self._create()
        for name in names:
            target = self.path / name
            if name not in self.entries and (target.exists() or target.is_symlink()) and not self.force:
                raise DinoUNetError(f"{target} exists and was not written by {self.command}; move it away or choose "
                                    f"another {self.option} folder.")
            self.entries.setdefault(name, None)  # fingerprinted when the run's output is complete
        self._write_manifest()
        return self.path

    def _make_room(self, name: str) -> None:
        """Clear ``name`` for a new entry: what we wrote there goes; anything else needs --force (a file of that
        name is then replaced, a folder of someone else's is never deleted)."""
        target = self.path / name
        if not (target.exists() or target.is_symlink()):
            return
        if name in self.entries and remove_ours(target, self.entries[name]):
            return
        if target.is_dir() and not target.is_symlink():
            raise DinoUNetError(f"{target} holds files this command did not write; move them away or choose another "
                                f"{self.command} output folder.")
        if not self.force:
            raise DinoUNetError(f"{target} was changed or written by someone else since {self.command} wrote it; "
                                f"move it away, or add --force to replace it.")

    def write(self, build: Callable[[Path], T], keep: Iterable[str] = (), needed_bytes: int | None = None) -> T:
        """``build(stage)`` writes every entry into a staging folder; then each entry replaces its namesake here and
        the manifest is written. Entries of our earlier output that this run did not write (and ``keep`` does not
        name) are removed as far as they are still ours; a failure leaves the folder as it was."""
        if needed_bytes:
            check_free_space(self.path, needed_bytes)
        self._create()
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=self.path))
        (stage / STAGE_MARKER).touch()
        try:
            try:
                result = build(stage)
            except NoSpaceError:
                raise no_space_error(self.path, needed_bytes) from None
            except (OSError, RuntimeError) as e:
                if is_no_space(e):
                    raise no_space_error(self.path, needed_bytes) from None
                raise
            (stage / STAGE_MARKER).unlink()
            names = sorted(p.name for p in stage.iterdir())
            for name in names:
                self._make_room(name)
            for name in names:
                os.replace(stage / name, self.path / name)
                self.entries[name] = fingerprint(self.path / name)
            keep = {k for k in keep if (self.path / k).exists()}
            for name in set(self.entries) - set(names) - keep:
                if remove_ours(self.path / name, self.entries[name]):
                    del self.entries[name]
            for name in keep:
                self.entries[name] = fingerprint(self.path / name)
            self._write_manifest()
            modes = [*(self.path / n for n in names)] + ([self.path] if self.created else [])
            for p in modes:  # writers such as torch's may create 0600; a folder the user had keeps its mode
                os.chmod(p, default_file_mode(directory=p.is_dir()))
            return result
        except BaseException:
            if self.created and not any(p.name != stage.name for p in self.path.iterdir()):
                shutil.rmtree(self.path, ignore_errors=True)
                self.created = False
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _plain_name(name: object) -> bool:
    """A manifest entry is one name inside the folder (a hand-edited manifest must not point elsewhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0") \
        and name != MANIFEST

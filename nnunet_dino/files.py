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


class OutputFolder:
    """A folder a command writes into under the rule above: checked on construction, created only when written."""

    def __init__(self, path: Path, command: str, force: bool = False, option: str = "-o"):
        self.path, self.command = Path(path).expanduser().absolute(), command
        self.created = False
        self.previous: list[str] = []
        if self.path.exists() and not self.path.is_dir():
            raise DinoUNetError(f"{option} {path} is a file; {command} writes a folder -- pass a new or empty folder.")
        self.option = option
        if not self.path.exists():
            return
        manifest = self.read_manifest(self.path)
        if manifest is not None and manifest.get("written_by") == command:
            self.previous = [n for n in manifest.get("files", []) if _plain_name(n)]
            return
        if any(self.path.iterdir()) and not force:
            raise DinoUNetError(f"{self.path} is not empty and holds no earlier output of {command}; pass a new or "
                                f"empty folder with {option}, or add --force to write into it (entries of the same "
                                f"name are replaced, nothing else is touched).")

    @staticmethod
    def read_manifest(folder: Path) -> dict | None:
        return read_json_object(folder / MANIFEST)

    def owns(self, name: str) -> bool:
        return name in self.previous

    def _create(self) -> None:
        if self.path.is_dir():
            return
        try:
            self.path.mkdir(parents=True)
        except OSError as e:
            raise DinoUNetError(f"Cannot create {self.path} ({e.strerror}); pass a writable {self.option}.") from None
        self.created = True

    def claim(self, *names: str) -> Path:
        """Create the folder now and record ``names`` as ours before another program (nnU-Net) writes them."""
        self._create()
        self.previous = sorted(set(self.previous) | set(names))
        atomic_write_json({"written_by": self.command, "files": self.previous}, self.path / MANIFEST)
        return self.path

    def write(self, build: Callable[[Path], T], keep: Iterable[str] = (), needed_bytes: int | None = None) -> T:
        """``build(stage)`` writes every entry into a staging folder; then each entry replaces its namesake here and
        the manifest is written. Entries of our earlier output that this run did not write (and ``keep`` does not
        name) are removed; a failure leaves the folder as it was."""
        if needed_bytes:
            check_free_space(self.path, needed_bytes)
        self._create()
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.path))
        try:
            try:
                result = build(stage)
            except NoSpaceError:
                raise no_space_error(self.path, needed_bytes) from None
            except (OSError, RuntimeError) as e:
                if is_no_space(e):
                    raise no_space_error(self.path, needed_bytes) from None
                raise
            names = sorted(p.name for p in stage.iterdir())
            for name in names:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    if not self.owns(name):
                        raise DinoUNetError(f"{target} is a folder this command did not write; move it away or "
                                            f"choose another {self.command} output folder.")
                    shutil.rmtree(target)
                os.replace(stage / name, target)
            for name in set(self.previous) - set(names) - set(keep):
                stale = self.path / name
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            files = sorted(set(names) | {k for k in keep if (self.path / k).exists()})
            atomic_write_json({"written_by": self.command, "files": files}, self.path / MANIFEST)
            self.previous = files
            for p in [self.path, *(self.path / n for n in names)]:  # writers such as torch's may create 0600
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
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and name != MANIFEST

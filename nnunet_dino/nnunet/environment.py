"""The environment nnU-Net needs to find our trainers: ``nnUNet_extTrainer`` and the opt-in persistent ``.pth``.

Shared by the CLI (``nnunet-dino env``) and the demo, which sets the variable for the stock commands it runs.
"""
from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

EXT_ENV = "nnUNet_extTrainer"
EXT_PACKAGE = "nnunet_dino.ext_trainers"
PTH_NAME = "nnunet_dino_ext_trainer.pth"


def trainer_folder() -> str:
    """The installed folder holding the one-line trainer re-export that nnUNet_extTrainer must name."""
    spec = importlib.util.find_spec(EXT_PACKAGE)
    return str(Path(list(spec.submodule_search_locations)[0]).resolve())


def ext_trainer_value() -> str:
    """The value nnUNet_extTrainer needs: any existing entries plus our folder."""
    folder = trainer_folder()
    current = [p for p in os.environ.get(EXT_ENV, "").split(os.pathsep) if p]
    return os.pathsep.join(current if folder in current else current + [folder])


def ext_trainer_export_line() -> str:
    """``export nnUNet_extTrainer=...`` with our folder appended to any existing value, quoted for the shell (a value
    with spaces or ``$(...)`` must reach the variable as it is, never run)."""
    from shlex import quote

    return f"export {EXT_ENV}={quote(ext_trainer_value())}"


def persist_file() -> Path:
    """Where ``nnunet-dino env --persist`` writes its one-line ``.pth`` (this environment's site-packages)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


PERSIST_MARKER = "# written by nnunet-dino env --persist; remove with nnunet-dino env --unpersist\n"


def persist_line(folder: str) -> str:
    """The line Python's site module runs at start-up: append our folder to nnUNet_extTrainer (idempotent)."""
    return (f"import os; os.environ['{EXT_ENV}'] = os.pathsep.join([p for p in os.environ.get('{EXT_ENV}', '')"
            f".split(os.pathsep) if p and p != {folder!r}] + [{folder!r}])\n")


def _is_ours(target: Path, folder: str) -> bool:
    """A regular file (not a link) holding exactly what --persist writes (or wrote before the marker line)."""
    if target.is_symlink() or not target.is_file():
        return False
    try:
        text = target.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return text in (PERSIST_MARKER + persist_line(folder), persist_line(folder))


def persist(folder: str) -> Path:
    """Write the ``.pth`` file; an existing file of that name is replaced only if it is exactly ours."""
    from nnunet_dino.errors import DinoUNetError
    from nnunet_dino.files import atomic_write_text

    target = persist_file()
    if (target.exists() or target.is_symlink()) and not _is_ours(target, folder):
        raise DinoUNetError(f"{target} exists and was not written by nnunet-dino env --persist (a link, or other "
                            f"content); nothing was changed -- move it away or use eval \"$(nnunet-dino env)\".")
    try:
        if not target.parent.is_dir():
            raise FileNotFoundError(2, "no such folder")
        atomic_write_text(target, PERSIST_MARKER + persist_line(folder))
    except OSError as e:
        raise DinoUNetError(f"Cannot write {target} ({e.strerror}); run with the permissions of that environment "
                            f"or use eval \"$(nnunet-dino env)\" instead.") from None
    return target


def unpersist(folder: str) -> Path | None:
    """Remove the ``.pth`` file if it is exactly ours; None when there is none; refuse any other file."""
    from nnunet_dino.errors import DinoUNetError

    target = persist_file()
    if not (target.exists() or target.is_symlink()):
        return None
    if not _is_ours(target, folder):
        raise DinoUNetError(f"{target} was not written by nnunet-dino env --persist (a link, or other content); "
                            f"nothing was removed -- check it and delete it yourself if it should go.")
    try:
        target.unlink()
    except OSError as e:
        raise DinoUNetError(f"Cannot remove {target} ({e.strerror}); delete it by hand or run with the "
                            f"permissions of that environment.") from None
    return target


def default_device() -> str:
    """What nnU-Net's -device should be here: cuda, else mps (Apple silicon), else cpu (nnU-Net's default is cuda)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def check_torch_pair(import_module=None) -> None:
    """torch and torchvision must be builds of one release pair from one source (a CPU torch beside the package
    index's torchvision fails deep inside nnU-Net with ``operator torchvision::nms does not exist``): checked before
    any work, one line naming the pair. torchvision 0.(m + 15) belongs to torch 2.m."""
    import importlib
    import importlib.metadata as metadata

    from nnunet_dino.errors import DinoUNetError

    try:
        vision = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return  # nnU-Net does not need it everywhere; nothing to mismatch
    torch_version = metadata.version("torch")
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    pair = f"0.{minor + 15}" if major == 2 else None
    try:
        (import_module or importlib.import_module)("torchvision")
        problem = None if pair is None or vision.startswith(pair + ".") or vision == pair else "another release"
    except (ImportError, RuntimeError, OSError) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem:
        want = f"torch=={torch_version.split('+')[0]} torchvision=={pair}.*" if pair else "torch torchvision"
        raise DinoUNetError(f"torchvision {vision} does not work with torch {torch_version} here ({problem}); install "
                            f"the pair built together, from one source: pip install '{want.split()[0]}' "
                            f"'{want.split()[1]}'.")

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
    """``export nnUNet_extTrainer=...`` with our folder appended to any existing value."""
    return f"export {EXT_ENV}={ext_trainer_value()}"


def persist_file() -> Path:
    """Where ``nnunet-dino env --persist`` writes its one-line ``.pth`` (this environment's site-packages)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def persist_line(folder: str) -> str:
    """The line Python's site module runs at start-up: append our folder to nnUNet_extTrainer (idempotent)."""
    return (f"import os; os.environ['{EXT_ENV}'] = os.pathsep.join([p for p in os.environ.get('{EXT_ENV}', '')"
            f".split(os.pathsep) if p and p != {folder!r}] + [{folder!r}])\n")


def default_device() -> str:
    """What nnU-Net's -device should be here: cuda, else mps (Apple silicon), else cpu (nnU-Net's default is cuda)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"

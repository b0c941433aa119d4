"""nnU-Net checkpoints for Dino U-Net: nnU-Net 2.8.1's checkpoint dict, built, written and read in one place.

We keep nnU-Net's schema (the keys below, the same meaning) so stock tools keep working: ``nnUNetv2_predict`` reads
``network_weights``, ``trainer_name`` and ``init_args``. Three things differ from nnU-Net's own save/load, which is
why this is not a call to ``super()``: the network's state dict holds only trainable weights; the optimizer
momentum (as large as the weights) is written only where a resume needs it; and files are read with
``weights_only=True`` and a short allow-list, so a crafted checkpoint cannot run code.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnunet_dino.errors import DinoUNetError

# nnU-Net 2.8.1's nnUNetTrainer.save_checkpoint writes exactly these keys (tests/test_checkpoints.py pins them).
CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
                   "init_args", "trainer_name", "inference_allowed_mirroring_axes")
_REQUIRED_KEYS = ("network_weights", "optimizer_state", "logging", "_best_ema", "current_epoch", "init_args")
# Marker stored instead of the optimizer state in weights-only checkpoints (value written by 0.1.0 too).
WEIGHTS_ONLY_MARKER = "weights-only checkpoint: optimizer momentum kept in checkpoint_latest.pth only"


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside DDP and/or torch.compile wrappers."""
    from torch._dynamo import OptimizedModule

    network = getattr(network, "module", network)  # DDP
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def build_checkpoint(trainer: Any, with_optimizer: bool) -> dict:
    """nnU-Net's checkpoint dict for ``trainer``; the optimizer state only when ``with_optimizer``."""
    return {
        "network_weights": unwrap(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict() if with_optimizer else {WEIGHTS_ONLY_MARKER: True},
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": type(trainer).__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


def restore_checkpoint(trainer: Any, checkpoint: Mapping) -> bool:
    """Put a checkpoint dict back into an initialised trainer; returns whether the optimizer state was restored."""
    missing = [k for k in _REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise DinoUNetError(f"This checkpoint lacks {', '.join(missing)}; it was not written by nnU-Net's trainer "
                            f"(use a checkpoint_final/best/latest.pth from a model folder).")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
    trainer.my_init_kwargs = checkpoint["init_args"]
    trainer.current_epoch = checkpoint["current_epoch"]
    trainer.logger.load_checkpoint(checkpoint["logging"])
    trainer._best_ema = checkpoint["_best_ema"]
    trainer.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                              trainer.inference_allowed_mirroring_axes)
    unwrap(trainer.network).load_state_dict(state)
    optimizer_state = checkpoint["optimizer_state"] or {}
    restored = not optimizer_state.get(WEIGHTS_ONLY_MARKER)
    if restored:
        trainer.optimizer.load_state_dict(optimizer_state)
    if trainer.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
    return restored


def _allowed_globals() -> list:
    """What nnU-Net checkpoints hold beyond tensors and containers: numpy scalars/arrays in the training log."""
    import numpy as np

    dtypes = {type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "bool")}
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def read_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict:
    """Load a checkpoint file without executing code: ``weights_only=True`` plus the numpy allow-list."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DinoUNetError(f"Checkpoint {path} does not exist; train first or pass an existing checkpoint.") from None
    except Exception as e:  # noqa: BLE001 - unpickling refusals come as several exception types
        first = " ".join(str(e).split())[:160]
        blocked = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if blocked:
            raise DinoUNetError(f"Refusing to load {path}: it holds objects other than weights (it would import "
                                f"{blocked.group(1)}); only load checkpoints you trust, written by nnU-Net.") from None
        raise DinoUNetError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); it is truncated "
                            f"or not a checkpoint — use another copy.") from None
    if not isinstance(checkpoint, dict):
        raise DinoUNetError(f"{path} is not an nnU-Net checkpoint (a {type(checkpoint).__name__}, not a dict).")
    return checkpoint


def write_checkpoint(checkpoint: dict, filename: str | os.PathLike) -> None:
    """Write atomically: a temporary file, then rename. A failed write leaves the previous file and no debris."""
    from nnunet_dino.files import NoSpaceError, atomic_write

    try:
        atomic_write(Path(filename), lambda tmp: torch.save(checkpoint, tmp))
    except NoSpaceError:  # say how training goes on
        raise DinoUNetError(f"No space left on device while saving {filename}; free space and resume with "
                            f"--c (the previous checkpoint is intact).") from None
    except (OSError, RuntimeError) as e:
        raise DinoUNetError(f"Could not save {filename} ({type(e).__name__}: {str(e)[:120]}); check the folder's "
                            f"permissions and free space.") from None

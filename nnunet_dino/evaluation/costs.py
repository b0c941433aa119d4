"""Training costs per trainer and fold for the benchmark: times, parameter counts, peak GPU memory."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nnunet_dino.evaluation.folders import Model


def _unique_numel(state: dict) -> int:
    """Floating-point elements of a state dict, each shared tensor once (nnU-Net's decoder keeps a reference to its
    encoder, so a stock checkpoint lists the encoder's weights twice)."""
    import torch

    seen = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): v.numel() for v in state.values()
            if torch.is_tensor(v) and v.is_floating_point()}
    return sum(seen.values())


def training_costs(models: Sequence[Model], folds: Sequence[int]) -> list[dict]:
    """Per trainer and fold: epoch time, total training time, trainable/frozen parameters, peak GPU memory.
    Our trainers write all of it to ``fold_k/costs.json``; for other trainers (stock nnU-Net) the times come from the
    epoch timestamps nnU-Net keeps in the checkpoint and the trainable parameters from the checkpoint's weights
    (stock nnU-Net freezes nothing; an older Dino U-Net model's frozen count is unknown)."""
    from nnunet_dino.nnunet.checkpoints import read_checkpoint
    from nnunet_dino.nnunet.costs import read_costs
    from nnunet_dino.nnunet.plans import DINO_CLASS

    rows = []
    for m in models:
        for fold in folds:
            row = {"trainer": m.name, "fold": fold, "peak_gpu_gib": np.nan}
            costs = read_costs(m.fold_dir(fold))
            ckpt_file = next((m.fold_dir(fold) / n for n in ("checkpoint_final.pth", "checkpoint_latest.pth")
                              if (m.fold_dir(fold) / n).is_file()), None)
            if costs is not None:
                epochs = costs["epoch_times_s"]
                row |= {"trainable_params_m": costs["trainable_params_m"], "frozen_params_m": costs["frozen_params_m"],
                        "peak_gpu_gib": np.nan if costs["peak_gpu_gib"] is None else costs["peak_gpu_gib"]}
            elif ckpt_file is not None:
                ckpt = read_checkpoint(ckpt_file)
                starts, ends = ckpt["logging"]["epoch_start_timestamps"], ckpt["logging"]["epoch_end_timestamps"]
                epochs = [e - s for s, e in zip(starts, ends)]
                plans = json.loads((m.folder / "plans.json").read_text()) if (m.folder / "plans.json").is_file() else {}
                dino = any(c.get("architecture", {}).get("network_class_name") == DINO_CLASS
                           for c in plans.get("configurations", {}).values())
                row |= {"trainable_params_m": _unique_numel(ckpt["network_weights"]) / 1e6,
                        "frozen_params_m": np.nan if dino else 0.0}
            else:
                rows.append(row)
                continue
            row |= {"epochs": len(epochs), "epoch_time_s": float(np.mean(epochs)) if epochs else np.nan,
                    "train_time_s": float(np.sum(epochs))}
            rows.append(row)
    return rows

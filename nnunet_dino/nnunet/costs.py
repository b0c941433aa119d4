"""What a training run cost, written by our trainers into each fold folder as ``costs.json`` for the benchmark.

A small JSON rather than log lines: the benchmark reads numbers, not text whose wording must agree with an f-string
elsewhere. Stock nnU-Net trainers write none; the benchmark then falls back to the checkpoint (epoch timestamps,
saved weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COSTS_FILE = "costs.json"


def split_cases(trainer: Any) -> tuple[list[str], list[str]]:
    """The (training, validation) cases of the trainer's fold, read once from nnU-Net's own split logic."""
    cached = getattr(trainer, "_nnunet_dino_split", None)
    if cached is None:
        train, val = trainer.do_split()
        cached = trainer._nnunet_dino_split = (sorted(map(str, train)), sorted(map(str, val)))
    return cached


def training_costs(trainer: Any) -> dict:
    """Parameters (trainable / frozen), every finished epoch's duration, the peak GPU memory so far, and the cases
    the fold trained on (so a benchmark can refuse a fold whose split changed since)."""
    params = list(trainer.network.parameters())
    log = trainer.logger.get_checkpoint()  # nnU-Net's own record: the same the checkpoint keeps
    starts, ends = log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", [])
    cuda = trainer.device.type == "cuda"
    return {
        "trainer": type(trainer).__name__,
        "trainable_params_m": sum(p.numel() for p in params if p.requires_grad) / 1e6,
        "frozen_params_m": sum(p.numel() for p in params if not p.requires_grad) / 1e6,
        "epoch_times_s": [float(e - s) for s, e in zip(starts, ends)],
        "peak_gpu_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else None,
        "training_cases": split_cases(trainer)[0],
    }


def write_costs(trainer: Any) -> None:
    from nnunet_dino.files import atomic_write_json

    if trainer.local_rank == 0:
        atomic_write_json(training_costs(trainer), Path(trainer.output_folder) / COSTS_FILE)


def read_costs(fold_dir: Path) -> dict | None:
    from nnunet_dino.files import read_json_object

    return read_json_object(fold_dir / COSTS_FILE)

"""nnU-Net's poly learning-rate schedule for optimizers whose parameter groups start at different rates."""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule applied to each parameter group's own initial rate (nnU-Net's PolyLRScheduler gives
    every group the same rate, which would train a fine-tuned backbone at the decoder's rate); stepped by nnU-Net
    with the epoch, like its own. nnU-Net's step runs with an initial rate of 1, which makes it the poly factor."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, exponent: float = 0.9,
                 current_step: int | None = None):
        self.group_lrs = [group["lr"] for group in optimizer.param_groups]
        super().__init__(optimizer, 1.0, max_steps, exponent, current_step)

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group, lr in zip(self.optimizer.param_groups, self.group_lrs, strict=True):
            group["lr"] *= lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

"""Trainers for the demo and the tests: short schedules, random backbones, and the stock nnU-Net baseline on the
same schedule. The ``_smoke`` trainers are for tests and CPU demos only (a tiny random backbone, a few iterations):
results with them say nothing about accuracy; the ``_random`` ones measure architecture and cost only.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dino.nnunet.trainers import BACKBONE_TRAINERS, nnUNetTrainerDinoUNet, record_epoch_costs


class nnUNetTrainerDinoUNet_demo(nnUNetTrainerDinoUNet):
    """The CPU demo's short schedule (``nnunet-dino demo --backbone``) with the backbone and weights the plans name."""
    backbone_name = None
    epochs = 8
    learning_rate = 1e-2
    momentum = 0.9  # 160 steps are too few for momentum 0.99 to settle; 0.9 learns every class reliably
    iterations_per_epoch = 20
    val_iterations_per_epoch = 2
    fixed_batch_size = 4


class nnUNetTrainerDinoUNet_smoke(nnUNetTrainerDinoUNet_demo):
    """TESTS AND CPU DEMOS ONLY: the tiny random test backbone on the demo schedule. Never for accuracy."""
    backbone_name = "dinov3_test_tiny"
    backbone_weights = "random"


class nnUNetTrainerDinoUNet_smoke_short(nnUNetTrainerDinoUNet_smoke):
    """TESTS ONLY: the smoke trainer for 2 epochs of 10 iterations, like nnUNetTrainer_smoke (tests that train many
    folds, e.g. a label-efficiency curve)."""
    epochs = 2
    iterations_per_epoch = 10


class nnUNetTrainerDinoUNet_random(nnUNetTrainerDinoUNet):
    """ARCHITECTURE AND COST ONLY, ACCURACY MEANINGLESS: the backbone the plans name, with random weights, so time
    and memory can be measured on your data (any backbone, any preset) before the weights arrive."""
    backbone_weights = "random"


class nnUNetTrainerDinoUNet_S_random(BACKBONE_TRAINERS["dinov3_vits16"]):
    """ARCHITECTURE AND COST ONLY, ACCURACY MEANINGLESS: the real ViT-S/16 Dino U-Net with random backbone weights,
    so time and memory can be measured on your data before Meta's licence arrives."""
    backbone_weights = "random"


class nnUNetTrainerDinoUNet_B_random(BACKBONE_TRAINERS["dinov3_vitb16"]):
    """ARCHITECTURE AND COST ONLY, ACCURACY MEANINGLESS: ViT-B/16 Dino U-Net with random backbone weights."""
    backbone_weights = "random"


class nnUNetTrainerDinoUNet_check(nnUNetTrainerDinoUNet):
    """Checks a set-up end to end in a minute or two before the real run: the backbone and weights the plans name,
    1 epoch of 5 iterations, then nnU-Net's full validation. Accuracy meaningless; weights, memory and every file
    path are exercised (``nnunet-dino plans`` prints this line first)."""
    epochs = 1
    iterations_per_epoch = 5
    val_iterations_per_epoch = 1
    fixed_batch_size = 2


class nnUNetTrainerDinoUNet_S_smoke(BACKBONE_TRAINERS["dinov3_vits16"], nnUNetTrainerDinoUNet_check):
    """nnUNetTrainerDinoUNet_check pinned to ViT-S/16 (kept for the model folders that name it)."""


# --- stock nnU-Net baseline on the same short schedule ----------------------------------------------------------
class nnUNetTrainer_demo(nnUNetTrainer):
    """Stock nnU-Net (its own network, loss and learning rate) on the demo's short schedule: the baseline for
    ``nnunet-dino benchmark`` on the demo data and in the tests. Never for accuracy claims."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        demo = nnUNetTrainerDinoUNet_demo
        self.num_epochs = demo.epochs
        self.num_iterations_per_epoch = demo.iterations_per_epoch
        self.num_val_iterations_per_epoch = demo.val_iterations_per_epoch
        self.configuration_manager.configuration["batch_size"] = demo.fixed_batch_size
        self.save_every = 1

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=nnUNetTrainerDinoUNet_demo.momentum, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        record_epoch_costs(self)


class nnUNetTrainer_smoke(nnUNetTrainer_demo):
    """TESTS ONLY: the stock baseline for 2 epochs of 10 iterations (the benchmark command's end-to-end test)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 10


__all__ = [name for name in dir() if name.startswith("nnUNetTrainer") and name != "nnUNetTrainer"
           and name not in ("nnUNetTrainerDinoUNet",)]

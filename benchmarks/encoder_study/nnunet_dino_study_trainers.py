"""Trainer variants of the encoder study (benchmarks/encoder_study.py): each changes one factor of the demo schedule.

Not part of the package: the study adds this folder to nnUNet_extTrainer. A factor that wins becomes a class
constant of the package's own trainers (see docs/benchmarks.md, "Encoder study").
"""
from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_demo
from nnunet_dino.nnunet.finetune_trainers import nnUNetTrainerDinoUNet_LoRA_demo


class nnUNetTrainerDinoUNet_demo_lr1e3(nnUNetTrainerDinoUNet_demo):
    """The demo schedule at the reference's learning rate (1e-3 instead of 1e-2)."""
    learning_rate = 1e-3


class nnUNetTrainerDinoUNet_demo_noIntAug(nnUNetTrainerDinoUNet_demo):
    """The demo schedule without nnU-Net's intensity augmentations (spatial ones and mirroring kept)."""
    intensity_augmentation = False


class nnUNetTrainerDinoUNet_demo_lr1e3_noIntAug(nnUNetTrainerDinoUNet_demo):
    """Both of the above."""
    learning_rate = 1e-3
    intensity_augmentation = False


class nnUNetTrainerDinoUNet_LoRA_demo_noIntAug(nnUNetTrainerDinoUNet_LoRA_demo):
    """LoRA rank 8 on the demo schedule without nnU-Net's intensity augmentations."""
    intensity_augmentation = False

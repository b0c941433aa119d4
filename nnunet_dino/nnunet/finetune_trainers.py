"""Trainers that fine-tune part of the backbone: ``-tr nnUNetTrainerDinoUNet_LoRA`` / ``_LastK`` (+ variants).

Each is the frozen trainer plus pins for the network's fine-tuning arguments (so the model folder's plans rebuild
the same network for ``nnUNetv2_predict`` and export) and a learning rate for the backbone's parameter group.
The frozen trainers stay the default and the reference.
"""
from __future__ import annotations

from typing import ClassVar

from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_demo, nnUNetTrainerDinoUNet_S_smoke
from nnunet_dino.nnunet.trainers import BACKBONE_TRAINERS, nnUNetTrainerDinoUNet

nnUNetTrainerDinoUNet_B = BACKBONE_TRAINERS["dinov3_vitb16"]


class _FineTune:
    """Mixin: the fine-tuning pins (rule: ``nnunet_dino.nnunet.plans.apply_trainer_pins``)."""

    lora_rank: ClassVar[int | None] = None
    lora_alpha: ClassVar[float | None] = None
    trainable_blocks: ClassVar[int | None] = None

    @classmethod
    def pins(cls) -> dict:
        return super().pins() | {"backbone_lora_rank": cls.lora_rank, "backbone_lora_alpha": cls.lora_alpha,
                                 "backbone_trainable_blocks": cls.trainable_blocks}


class _LoRA(_FineTune):
    """LoRA rank 8 (alpha 8) on attn.qkv and attn.proj of every block up to the last tapped one; B starts at zero, so
    training starts from the frozen model. The LoRA factors train at the decoder's learning rate."""
    lora_rank = 8


class _LastK(_FineTune):
    """The last 2 blocks up to the last tapped one trainable, at a tenth of the decoder's learning rate (they start
    from pretrained values; the full rate would wash them out)."""
    trainable_blocks = 2


class nnUNetTrainerDinoUNet_LoRA(_LoRA, nnUNetTrainerDinoUNet):
    __doc__ = "The plans' backbone (ViT-S/16 when they name none). " + _LoRA.__doc__


class nnUNetTrainerDinoUNet_B_LoRA(_LoRA, nnUNetTrainerDinoUNet_B):
    __doc__ = "ViT-B/16. " + _LoRA.__doc__


class nnUNetTrainerDinoUNet_LastK(_LastK, nnUNetTrainerDinoUNet):
    __doc__ = "The plans' backbone (ViT-S/16 when they name none). " + _LastK.__doc__
    backbone_learning_rate = nnUNetTrainerDinoUNet.learning_rate / 10


class nnUNetTrainerDinoUNet_B_LastK(_LastK, nnUNetTrainerDinoUNet_B):
    __doc__ = "ViT-B/16. " + _LastK.__doc__
    backbone_learning_rate = nnUNetTrainerDinoUNet_B.learning_rate / 10


class nnUNetTrainerDinoUNet_LoRA_demo(_LoRA, nnUNetTrainerDinoUNet_demo):
    """The demo's short schedule with the plans' backbone, LoRA rank 8 (frozen vs LoRA vs last-k on the demo)."""


class nnUNetTrainerDinoUNet_LastK_demo(_LastK, nnUNetTrainerDinoUNet_demo):
    """The demo's short schedule with the plans' backbone, the last 2 blocks trainable."""
    backbone_learning_rate = nnUNetTrainerDinoUNet_demo.learning_rate / 10


class nnUNetTrainerDinoUNet_S_LoRA_smoke(_LoRA, nnUNetTrainerDinoUNet_S_smoke):
    """Checks a LoRA set-up in a minute: ViT-S from nnUNet_dino_weights, 1 epoch of 5 iterations."""


class nnUNetTrainerDinoUNet_S_LastK_smoke(_LastK, nnUNetTrainerDinoUNet_S_smoke):
    """Checks a last-k set-up in a minute: ViT-S from nnUNet_dino_weights, 1 epoch of 5 iterations."""
    backbone_learning_rate = nnUNetTrainerDinoUNet_S_smoke.learning_rate / 10


class nnUNetTrainerDinoUNet_LoRA_smoke(nnUNetTrainerDinoUNet_LoRA_demo):
    """TESTS ONLY: the tiny random test backbone with LoRA, 2 epochs of 10 iterations."""
    backbone_name = "dinov3_test_tiny"
    backbone_weights = "random"
    epochs = 2
    iterations_per_epoch = 10


class nnUNetTrainerDinoUNet_LastK_smoke(nnUNetTrainerDinoUNet_LastK_demo):
    """TESTS ONLY: the tiny random test backbone with its last 2 blocks trainable, 2 epochs of 10 iterations."""
    backbone_name = "dinov3_test_tiny"
    backbone_weights = "random"
    epochs = 2
    iterations_per_epoch = 10


__all__ = [name for name in dir() if name.startswith("nnUNetTrainerDinoUNet_") and ("LoRA" in name or "LastK" in name)]

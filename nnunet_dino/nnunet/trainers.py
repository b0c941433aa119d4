"""nnU-Net trainers for Dino U-Net: ``nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerDinoUNet``.

The base trainer follows the reference recipe (SGD Nesterov 0.99, weight decay 3e-5, lr 1e-3, poly schedule, no
deep supervision, gradient clipping, over trainable parameters only; torch.compile opt-in). Each variant is a few
class constants. Everything that shapes the network comes from the plans and these constants, never from instance
state, so ``nnUNetv2_predict`` rebuilds the same network in a fresh process.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_dino.backbones import BACKBONES, BackboneSpec, check_weight_file
from nnunet_dino.errors import DinoUNetError, install_excepthook
from nnunet_dino.network.adapter import NUM_LEVELS
from nnunet_dino.nnunet.checkpoints import (
    build_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    unwrap,
    write_checkpoint,
)
from nnunet_dino.nnunet.costs import write_costs
from nnunet_dino.nnunet.logs import route_to_trainer
from nnunet_dino.nnunet.plans import apply_trainer_pins, dino_architecture, network_defaults, round_patch_size

install_excepthook()  # a DinoUNetError raised under nnUNetv2_* prints one line, not a traceback


def record_epoch_costs(trainer: nnUNetTrainer) -> None:
    """After each epoch: the peak GPU memory in the log (for people) and costs.json (for nnunet-dino benchmark)."""
    if trainer.device.type == "cuda":
        trainer.print_to_log_file(f"peak GPU memory {torch.cuda.max_memory_allocated(trainer.device) / 2**30:.2f} GiB")
    write_costs(trainer)


def is_intensity_transform(transform: object) -> bool:
    """One of nnU-Net's random intensity augmentations (they change voxel values, not geometry or labels)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    inner = getattr(transform, "transform", transform)  # nnU-Net wraps each in a RandomTransform
    return isinstance(inner, (MultiplicativeBrightnessTransform, ContrastTransform, GammaTransform,
                              GaussianNoiseTransform, GaussianBlurTransform, SimulateLowResolutionTransform))


class nnUNetTrainerDinoUNet(nnUNetTrainer):
    """Dino U-Net with the frozen backbone the plans name (DINOv3 ViT-S/16 when they name none): the reference recipe.

    Trainer constants vs plans, one rule: ``backbone_name``, ``backbone_weights`` and ``backbone_dtype`` are pins
    when set (not None). A pin fills what the plans leave open and must agree with what the plans name; a
    contradiction is refused with a message (``nnunet_dino.nnunet.plans.apply_trainer_pins``). The schedule constants
    (epochs, learning rate, ...) are the trainer's alone; plans never hold them.
    """

    backbone_name: ClassVar[str | None] = None      # None: the plans' backbone (DinoUNet's default if none)
    backbone_weights: ClassVar[str | None] = None   # None: Meta's file from nnUNet_dino_weights; "random" for tests
    backbone_dtype: ClassVar[str | None] = None     # "bfloat16" halves the memory of the frozen weights
    epochs: ClassVar[int] = 200
    learning_rate: ClassVar[float] = 1e-3
    backbone_learning_rate: ClassVar[float | None] = None  # fine-tuned backbone parts only (None: learning_rate)
    momentum: ClassVar[float] = 0.99
    iterations_per_epoch: ClassVar[int] = 250
    val_iterations_per_epoch: ClassVar[int] = 10
    use_deep_supervision: ClassVar[bool] = False
    fixed_batch_size: ClassVar[int | None] = None   # None: the planned batch size
    # nnU-Net's intensity transforms (noise, blur, brightness, contrast, low resolution, gamma) move the frozen
    # encoder's input away from what it was pre-trained on; False keeps only the spatial ones (docs/benchmarks.md)
    intensity_augmentation: ClassVar[bool] = True
    # checkpoint_final/best skip the optimizer momentum (as large as the weights): Dino U-Net-S stays ~25 MB, 7B under
    # 1 GB. These files keep it, so --c resumes the exact optimizer state.
    checkpoints_with_optimizer: ClassVar[tuple[str, ...]] = ("checkpoint_latest.pth",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.preflight(plans, configuration, device)  # before nnU-Net creates any folder
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # checkpoint_latest (with momentum) every epoch: --c resumes exactly, short schedules too
        self.num_epochs = self.epochs
        self.initial_lr = self.learning_rate
        self.num_iterations_per_epoch = self.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.val_iterations_per_epoch
        self.enable_deep_supervision = self.use_deep_supervision
        # A pure function of the plans, written to both places so the model folder's plans.json (used by
        # nnUNetv2_predict) tiles with the same patch size; --c and DDP ranks arrive at the same value.
        self.planned_patch_size = list(self.configuration_manager.patch_size)
        patch = round_patch_size(self.planned_patch_size)
        self.configuration_manager.configuration["patch_size"] = patch
        self.plans_manager.plans["configurations"][configuration]["patch_size"] = patch
        if self.fixed_batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = self.fixed_batch_size

    @classmethod
    def preflight(cls, plans: dict, configuration: str, device: torch.device) -> None:
        """Every refusal we can make before nnU-Net writes anything: a refused run leaves nothing on disk."""
        from nnunet_dino.nnunet.environment import check_torch_pair

        check_torch_pair()
        cfg = PlansManager(plans).get_configuration(configuration)
        if len(cfg.patch_size) != 2:
            raise DinoUNetError(
                f"Dino U-Net is 2D only but configuration '{configuration}' is 3D; run "
                f"nnUNetv2_train DATASET 2d FOLD -tr {cls.__name__}."
            )
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise DinoUNetError(
                f"No CUDA GPU is available here; add -device cpu (or -device mps on Apple silicon) to "
                f"nnUNetv2_train ... -tr {cls.__name__}."
            )
        kwargs = cls.dino_arch(cfg.configuration["architecture"])["arch_kwargs"]
        # weights: found, readable, right variant, hash (cached; the file is memory-mapped, not read)
        check_weight_file(kwargs.get("backbone") or network_defaults()["backbone"], kwargs.get("backbone_weights"),
                          kwargs.get("backbone_weights_sha256"))

    # --- network --------------------------------------------------------------------------------------------
    @classmethod
    def pins(cls) -> dict:
        """The plans keys this trainer fixes (see the class docstring for the rule)."""
        return {"backbone": cls.backbone_name, "backbone_weights": cls.backbone_weights,
                "backbone_dtype": cls.backbone_dtype}

    @classmethod
    def dino_arch(cls, arch: dict) -> dict:
        """This trainer's DinoUNet architecture block for a plans architecture (stock or DinoUNet)."""
        return apply_trainer_pins(dino_architecture(arch), cls.pins(), cls.__name__)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = False) -> nn.Module:
        """nnU-Net >= 2.8.1 calls this (also statically, for prediction) with the plans of the model folder."""
        block = cls.dino_arch(configuration_manager.configuration["architecture"])
        # allow_init=False: nnU-Net's He init must never touch the pretrained backbone
        return get_network_from_plans(block["network_class_name"], block["arch_kwargs"], block["_kw_requires_import"],
                                      num_input_channels, num_output_channels, allow_init=False,
                                      deep_supervision=enable_deep_supervision)

    def initialize(self) -> None:
        if self.was_initialized:
            return
        route_to_trainer(self)  # hashing, mapping and random-weights notes go to the training log from here on
        super().initialize()
        # Record the resolved backbone (file name + SHA-256) in the plans the model folder keeps, so a copied
        # model folder finds the same file by name and refuses a different one.
        network = unwrap(self.network)
        fingerprint = network.backbone.fingerprint()
        cfg = self.plans_manager.plans["configurations"][self.configuration_name]
        block = self.dino_arch(cfg["architecture"])
        block["arch_kwargs"]["backbone_weights"] = fingerprint["weights_file"] or "random"
        block["arch_kwargs"]["backbone_weights_sha256"] = fingerprint["weights_sha256"]
        cfg["architecture"] = block
        self._log_network_summary(network)

    def _log_network_summary(self, network: nn.Module) -> None:
        counts = network.trainable_parameter_counts()
        backbone = network.backbone
        dtype = next(backbone.parameters()).dtype
        mixer = "learned 1x1 mixer" if network.channel_mixer is not None else network.channel_mode
        self.print_to_log_file(
            f"Dino U-Net: backbone {backbone.name}, weights {backbone.weights_file or 'RANDOM (test only)'} "
            f"(SHA-256 {backbone.weights_sha256}), backbone dtype {str(dtype).replace('torch.', '')}; "
            f"trainable {counts['total'] / 1e6:.2f} M, frozen {counts['frozen_backbone'] / 1e6:.2f} M parameters"
            f"{self._fine_tuning_note(counts)}; patch size {self.configuration_manager.patch_size} "
            f"(planned {self.planned_patch_size}); "
            f"{network.input_channels} input channel(s) -> 3 ({mixer})")

    def _fine_tuning_note(self, counts: dict) -> str:
        if not counts["backbone_adapted"]:
            return ""
        kwargs = self.dino_arch(self.configuration_manager.configuration["architecture"])["arch_kwargs"]
        how = (f"LoRA rank {kwargs['backbone_lora_rank']}" if kwargs.get("backbone_lora_rank")
               else f"last {kwargs.get('backbone_trainable_blocks')} block(s)")
        lr = self.backbone_learning_rate or self.initial_lr
        return f" (of which backbone {how}: {counts['backbone_adapted'] / 1e6:.3f} M at learning rate {lr:g})"

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        record_epoch_costs(self)

    def _do_i_compile(self) -> bool:
        """torch.compile is opt-in (nnUNet_compile=1): compile time and graph breaks cost more than they give here."""
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def configure_optimizers(self):
        """SGD over trainable parameters only; a fine-tuned backbone part gets its own group and learning rate."""
        from nnunet_dino.nnunet.scheduler import GroupPolyLRScheduler

        named = [(n, p) for n, p in unwrap(self.network).named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not n.startswith("backbone.")], "lr": self.initial_lr}]
        backbone = [p for n, p in named if n.startswith("backbone.")]
        if backbone:
            groups.append({"params": backbone, "lr": self.backbone_learning_rate or self.initial_lr})
        optimizer = torch.optim.SGD(groups, self.initial_lr, weight_decay=self.weight_decay, momentum=self.momentum,
                                    nesterov=True)
        return optimizer, GroupPolyLRScheduler(optimizer, self.num_epochs)

    @classmethod
    def get_training_transforms(cls, *args, **kwargs):
        """nnU-Net's training transforms, less the intensity ones when ``intensity_augmentation`` is False."""
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        if not cls.intensity_augmentation:
            transforms.transforms = [t for t in transforms.transforms if not is_intensity_transform(t)]
        return transforms

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return [[2.0 ** -i] * 2 for i in range(NUM_LEVELS - 1)]  # the decoder's outputs: H, H/2, H/4

    # --- checkpoints (nnunet_dino.nnunet.checkpoints) ----------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """Trainable weights only (the network's state dict drops the backbone), atomically; see the class constant
        ``checkpoints_with_optimizer`` for where the momentum goes."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        with_optimizer = os.path.basename(filename) in self.checkpoints_with_optimizer
        write_checkpoint(build_checkpoint(self, with_optimizer=with_optimizer), filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's loading (also for dicts, broken in 2.8.1), read safely, weights-only checkpoints accepted."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(checkpoint, map_location=self.device)
        if not restore_checkpoint(self, checkpoint):
            self.print_to_log_file("Checkpoint holds weights only; SGD momentum restarts from zero.")


# --- one backbone each, generated from the registry (a new backbone needs no code here) --------------------------
def _pinning_trainer(spec: BackboneSpec) -> type:
    doc = (f"{spec.name}, pinned: refuses plans of another backbone (weights from {spec.weights_origin}"
           f"{'; frozen weights in ' + spec.default_dtype if spec.default_dtype else ''}).")
    return type(spec.trainer, (nnUNetTrainerDinoUNet,), {
        "__module__": __name__, "__qualname__": spec.trainer, "__doc__": doc,
        "backbone_name": spec.name, "backbone_dtype": spec.default_dtype})


BACKBONE_TRAINERS: dict[str, type] = {s.name: _pinning_trainer(s) for s in BACKBONES.values() if s.trainer}
globals().update({cls.__name__: cls for cls in BACKBONE_TRAINERS.values()})  # importable by name, picklable


# --- training length and options, in nnU-Net's naming style -------------------------------------------------------
class nnUNetTrainerDinoUNet_50epochs(nnUNetTrainerDinoUNet):
    epochs = 50


class nnUNetTrainerDinoUNet_1000epochs(nnUNetTrainerDinoUNet):
    epochs = 1000


class nnUNetTrainerDinoUNet_B_50epochs(BACKBONE_TRAINERS["dinov3_vitb16"]):
    epochs = 50


class nnUNetTrainerDinoUNet_B_1000epochs(BACKBONE_TRAINERS["dinov3_vitb16"]):
    epochs = 1000


class nnUNetTrainerDinoUNet_DS(nnUNetTrainerDinoUNet):
    """With deep supervision on the decoder's three outputs (off in the reference)."""
    use_deep_supervision = True


__all__ = [name for name in dir() if name.startswith("nnUNetTrainerDinoUNet")]

"""nnunet-dino: Dino U-Net (frozen DINOv3 + adapter + FAPM + U-Net decoder) as a plugin for stock nnU-Net v2.

Public API: ``build_backbone`` (nnunet_dino.backbones), ``DinoUNet`` (nnunet_dino.network) and the trainers in
nnunet_dino.nnunet.trainers. Imported lazily so ``import nnunet_dino`` stays cheap.
"""
from nnunet_dino.nnunet.logs import install_default_handler as _install_default_handler

__version__ = "0.1.0"
_install_default_handler()
__all__ = ["build_backbone", "DinoUNet", "DinoUNetError", "__version__"]


def __getattr__(name: str):
    if name == "build_backbone":
        from nnunet_dino.backbones import build_backbone
        return build_backbone
    if name == "DinoUNet":
        from nnunet_dino.network import DinoUNet
        return DinoUNet
    if name == "DinoUNetError":
        from nnunet_dino.errors import DinoUNetError
        return DinoUNetError
    raise AttributeError(f"module 'nnunet_dino' has no attribute {name!r}")

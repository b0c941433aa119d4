"""The Dino U-Net network, one module per box of the paper's figure: backbone taps -> adapter (spatial prior +
deformable-attention extractors) -> FAPM -> U-Net decoder. Plans name ``nnunet_dino.network.DinoUNet``."""
from nnunet_dino.network.dino_unet import NETWORK_MULTIPLE, DinoUNet

__all__ = ["NETWORK_MULTIPLE", "DinoUNet"]

"""nnunet-dino: Dino U-Net (frozen DINOv3 + adapter + FAPM + U-Net decoder) as a plugin for stock nnU-Net v2."""
__version__ = "0.1.0"

"""Build a Dino U-Net in Python and run it on one image (no nnU-Net training needed).

    python examples/python_api.py [path/to/image.png]

Uses Meta's ViT-S file from $nnUNet_dino_weights when present, else the tiny random test backbone.
"""
import sys

import numpy as np
import torch
from PIL import Image

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import DinoUNet


def main() -> None:
    if len(sys.argv) > 1:
        image = np.asarray(Image.open(sys.argv[1]).convert("L"), dtype=np.float32)
    else:
        image = np.random.default_rng(0).normal(size=(233, 197)).astype(np.float32)  # any size works
    x = torch.from_numpy((image - image.mean()) / (image.std() + 1e-8))[None, None]  # (B=1, C=1, H, W), z-scored

    try:
        net = DinoUNet(input_channels=1, num_classes=3, backbone="dinov3_vits16")  # weights from nnUNet_dino_weights
    except DinoUNetError as e:
        print(f"{e}\n-> falling back to the tiny random test backbone")
        net = DinoUNet(input_channels=1, num_classes=3, backbone="dinov3_test_tiny")
    net.eval()
    with torch.no_grad():
        logits = net(x)
    print("logits", tuple(logits.shape), "labels present", torch.unique(logits.argmax(1)).tolist())
    for part, n in net.trainable_parameter_counts().items():
        print(f"{part:<16} {n / 1e6:8.3f} M")
    # the state dict is small: trainable weights + a backbone fingerprint, no frozen ViT
    print("state dict keys:", len(net.state_dict()), "fingerprint:", net.state_dict()["_extra_state"])


if __name__ == "__main__":
    main()

"""The conv / norm / dropout / nonlinearity ops of the network's blocks and their default kwargs, in one place.

Plans name ops by import path (strings); the network, FAPM, decoder and plans writer take the defaults from here.
Which import paths a plans file may name is ``nnunet_dino.nnunet.allowlist``'s business.
"""
from __future__ import annotations

import copy

OP_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")
DEFAULT_OPS = {
    "conv_op": "torch.nn.modules.conv.Conv2d",
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
    "dropout_op": None,
    "nonlin": "torch.nn.LeakyReLU",
}
_DEFAULT_NORM_KWARGS = {"eps": 1e-5, "affine": True}
_DEFAULT_NONLIN_KWARGS = {"inplace": True}


def norm_kwargs(value: dict | None = None) -> dict:
    """A fresh copy of the norm kwargs (nnU-Net's InstanceNorm defaults when None)."""
    return copy.deepcopy(_DEFAULT_NORM_KWARGS if value is None else dict(value))


def nonlin_kwargs(value: dict | None = None) -> dict:
    """A fresh copy of the nonlinearity kwargs (in-place LeakyReLU when None)."""
    return copy.deepcopy(_DEFAULT_NONLIN_KWARGS if value is None else dict(value))

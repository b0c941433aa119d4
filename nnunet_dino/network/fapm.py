"""FAPM, the fidelity-aware projection module: D-wide adapter maps down to the decoder's widths.

A naive 1x1 conv from D (384..4096) to 32..256 channels throws information away. FAPM first maps every scale to a
rank-r space twice: a basis shared by all scales (common context) and a basis of its own. The shared projection
modulates the specific one FiLM-style (z = gamma * z_spec + beta), then a refinement branch (1x1, norm, act,
depthwise-separable 3x3, 1x1, squeeze-excitation) plus a 1x1 shortcut gives the output. Norm and nonlinearity come
from the nnU-Net plans.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnunet_dino.network.ops import nonlin_kwargs as default_nonlin_kwargs
from nnunet_dino.network.ops import norm_kwargs as default_norm_kwargs


class SqueezeExcitation(nn.Module):
    """Channel gating from global context (always ReLU inside, sigmoid gate)."""

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=bias)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class FAPMBranch(nn.Module):
    """One scale: specific basis, FiLM by the shared context, refinement + shortcut."""

    def __init__(self, dim: int, out_channels: int, rank: int, conv_bias: bool, norm_op, norm_op_kwargs: dict,
                 nonlin, nonlin_kwargs: dict):
        super().__init__()
        oc = out_channels

        def norm_act():
            return [norm_op(oc, **norm_op_kwargs), nonlin(**nonlin_kwargs)]

        self.specific_basis = nn.Conv2d(dim, rank, 1, bias=conv_bias)
        self.film = nn.Conv2d(rank, 2 * rank, 1, bias=conv_bias)
        self.refine = nn.Sequential(
            nn.Conv2d(rank, oc, 1, bias=conv_bias), *norm_act(),
            nn.Conv2d(oc, oc, 3, 1, 1, groups=oc, bias=conv_bias),  # depthwise
            nn.Conv2d(oc, oc, 1, bias=conv_bias), *norm_act(),      # pointwise
            nn.Conv2d(oc, oc, 1, bias=conv_bias),
            SqueezeExcitation(oc, 16, conv_bias),
        )
        self.shortcut = nn.Identity() if oc == rank else nn.Conv2d(rank, oc, 1, bias=conv_bias)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(shared).chunk(2, dim=1)
        z = gamma * self.specific_basis(x) + beta
        return self.refine(z) + self.shortcut(z)


class FAPM(nn.Module):
    """Project four D-wide maps to ``out_channels`` (e.g. 32, 64, 128, 256) through a shared rank-r basis."""

    def __init__(self, dim: int, out_channels: Sequence[int] = (32, 64, 128, 256), rank: int = 256,
                 conv_bias: bool = True, norm_op=nn.InstanceNorm2d, norm_op_kwargs: dict | None = None,
                 nonlin=nn.LeakyReLU, nonlin_kwargs: dict | None = None):
        super().__init__()
        self.shared_basis = nn.Conv2d(dim, rank, 1, bias=conv_bias)
        self.branches = nn.ModuleList(
            FAPMBranch(dim, oc, rank, conv_bias=conv_bias, norm_op=norm_op,
                       norm_op_kwargs=default_norm_kwargs(norm_op_kwargs), nonlin=nonlin,
                       nonlin_kwargs=default_nonlin_kwargs(nonlin_kwargs))
            for oc in out_channels
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [branch(x, self.shared_basis(x)) for branch, x in zip(self.branches, levels, strict=True)]

"""Learned upsampling of the FAPM outputs to skip resolutions, and the U-Net decoder on top of them.

The adapter's levels sit at 1/4..1/32; the decoder wants skips at H, H/2, H/4, H/8, so each level goes up 4x
through one transposed conv applied twice with the same weights (as the reference). The decoder is nnU-Net's
(transposed conv, skip concat, stacked conv blocks) but builds only the segmentation heads it uses, so DDP never
sees unused trainable parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn


class LearnedUpsample(nn.Module):
    """One 2x transposed conv, repeated while doubling does not overshoot; bilinear only if still not exact."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, 2, bias=bias)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        while x.shape[-2] * 2 <= size[0] and x.shape[-1] * 2 <= size[1]:
            x = self.up(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


class UNetDecoder(nn.Module):
    """Three decoder stages from the coarsest skip (the bottleneck) up to full resolution.

    ``deep_supervision``: also build heads on the two coarser stages; forward then returns
    [full, 1/2, 1/4] logits as nnU-Net expects. Toggling the attribute on a model built without them has no effect.
    """

    def __init__(self, features: Sequence[int], num_classes: int, n_conv_per_stage: int | Sequence[int] = 2,
                 conv_op=nn.Conv2d, kernel_size: int = 3, conv_bias: bool = True, norm_op=None,
                 norm_op_kwargs: dict | None = None, dropout_op=None, dropout_op_kwargs: dict | None = None,
                 nonlin=None, nonlin_kwargs: dict | None = None, deep_supervision: bool = False):
        super().__init__()
        n_stages = len(features) - 1
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * n_stages
        if len(n_conv_per_stage) != n_stages:
            raise ValueError(f"n_conv_per_stage needs {n_stages} entries, got {list(n_conv_per_stage)}")
        self.transpconvs = nn.ModuleList()
        self.stages = nn.ModuleList()
        for s in range(n_stages):
            below, skip = features[-1 - s], features[-2 - s]
            self.transpconvs.append(nn.ConvTranspose2d(below, skip, 2, 2, bias=conv_bias))
            self.stages.append(StackedConvBlocks(
                num_convs=n_conv_per_stage[s], conv_op=conv_op, input_channels=2 * skip, output_channels=skip,
                kernel_size=kernel_size, initial_stride=1, conv_bias=conv_bias, norm_op=norm_op,
                norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs,
                nonlin=nonlin, nonlin_kwargs=nonlin_kwargs))
        self.seg_head = conv_op(features[0], num_classes, 1, 1, 0, bias=True)
        # aux heads for the coarser stages, highest resolution first: 1/2, 1/4
        self.aux_heads = nn.ModuleList(
            conv_op(features[k], num_classes, 1, 1, 0, bias=True) for k in range(1, n_stages)
        ) if deep_supervision else None
        self.deep_supervision = deep_supervision

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """skips: highest resolution first, e.g. [32 @ H, 64 @ H/2, 128 @ H/4, 256 @ H/8]."""
        x = skips[-1]
        stage_outputs = []
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            x = stage(torch.cat([up(x), skips[-2 - s]], dim=1))
            stage_outputs.append(x)
        logits = self.seg_head(x)
        if not (self.deep_supervision and self.aux_heads is not None):
            return logits
        coarser = stage_outputs[-2::-1]  # 1/2, 1/4, ...
        return [logits] + [head(o) for head, o in zip(self.aux_heads, coarser, strict=True)]

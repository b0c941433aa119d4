"""The Dino adapter: a CNN spatial prior plus interaction blocks that pull DINOv3 semantics into it.

A small CNN (spatial prior module) gives fine detail at 1/4, 1/8, 1/16 and 1/32 of the image. Its 1/8-1/32 maps
become one query sequence that, block by block, attends to one tapped ViT layer each with deformable attention
(the "extractor"; there is no injector, the ViT is never modified). Fusion then upsamples the 1/8 map onto the
1/4 map, adds the resized ViT layers and normalises each level. Output: four maps of ViT width D.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_dino.backbones.timm_compat import timm
from nnunet_dino.network.deformable_attention import MultiScaleDeformableAttention

DropPath, trunc_normal_ = timm().layers.DropPath, timm().layers.trunc_normal_

Shape = tuple[int, int]

# The pyramid every later box works on: four levels at these strides of the (padded) image. The ViT tokens are read
# on the 1/16 grid (backbones.TOKEN_GRID); the input must be a multiple of the coarsest stride.
LEVEL_STRIDES = (4, 8, 16, 32)
NUM_LEVELS = len(LEVEL_STRIDES)
COARSEST_STRIDE = LEVEL_STRIDES[-1]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """CNN pyramid at 1/4, 1/8, 1/16, 1/32, each projected to the ViT width by a 1x1 conv."""

    def __init__(self, dim: int, channels: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn_relu(3, channels, 2), _conv_bn_relu(channels, channels, 1), _conv_bn_relu(channels, channels, 1),
            nn.MaxPool2d(3, 2, 1),
        )
        self.down8 = _conv_bn_relu(channels, 2 * channels, 2)
        self.down16 = _conv_bn_relu(2 * channels, 4 * channels, 2)
        self.down32 = _conv_bn_relu(4 * channels, 4 * channels, 2)
        widths = (channels, 2 * channels, 4 * channels, 4 * channels)
        self.proj = nn.ModuleList(nn.Conv2d(w, dim, 1) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c4 = self.stem(x)
        c8 = self.down8(c4)
        c16 = self.down16(c8)
        c32 = self.down32(c16)
        return [proj(c) for proj, c in zip(self.proj, (c4, c8, c16, c32), strict=True)]


class ConvFFN(nn.Module):
    """Token MLP with a 3x3 depthwise conv applied on each level's own 2-D grid (local context)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[Shape]) -> torch.Tensor:
        x = self.fc1(x)
        bsz, _, ch = x.shape
        parts, start = [], 0
        for h, w in shapes:
            grid = x[:, start:start + h * w].transpose(1, 2).reshape(bsz, ch, h, w)
            parts.append(self.dwconv(grid).flatten(2).transpose(1, 2))
            start += h * w
        return self.fc2(self.act(torch.cat(parts, dim=1)))


class Extractor(nn.Module):
    """Spatial queries read one ViT layer through deformable attention, then a ConvFFN; both residual."""

    def __init__(self, dim: int, num_heads: int, num_points: int, value_ratio: float, ffn_ratio: float,
                 drop_path: float, use_checkpoint: bool):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleDeformableAttention(dim, num_heads, 1, num_points, value_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.use_checkpoint = use_checkpoint

    def _forward(self, query, reference_points, feat, feat_shape, query_shapes):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), [feat_shape])
        return query + self.drop_path(self.ffn(self.ffn_norm(query), query_shapes))

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor, feat_shape: Shape,
                query_shapes: Sequence[Shape]) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, query, reference_points, feat, feat_shape, query_shapes,
                              use_reentrant=False)
        return self._forward(query, reference_points, feat, feat_shape, query_shapes)


def reference_points(shapes: Sequence[Shape], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centres of every query position on its own grid, normalised to [0, 1] as (x, y): (1, Lq, 1, 2).

    Never below fp32: under fp16 autocast a half-precision grid would shift sampling points by a tenth of a pixel."""
    dtype = torch.promote_types(dtype, torch.float32)
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=dtype, device=device) + 0.5) / h,
            (torch.arange(w, dtype=dtype, device=device) + 0.5) / w, indexing="ij")
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(points, 0)[None, :, None]


class DinoAdapter(nn.Module):
    """Spatial prior + one interaction block per tapped ViT layer + fusion into four D-wide maps (1/4..1/32)."""

    def __init__(self, dim: int, num_taps: int = NUM_LEVELS, spm_channels: int = 64, num_heads: int = 16,
                 num_points: int = 4, value_ratio: float = 0.5, ffn_ratio: float = 0.25, drop_path: float = 0.3,
                 extra_extractors: int = 2, add_vit_features: bool = True, use_checkpoint: bool = True,
                 vit_feature_norm: bool = False):
        super().__init__()
        self.spm = SpatialPriorModule(dim, spm_channels)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))

        def extractor():
            return Extractor(dim, num_heads=num_heads, num_points=num_points, value_ratio=value_ratio,
                             ffn_ratio=ffn_ratio, drop_path=drop_path, use_checkpoint=use_checkpoint)

        # interaction block i = extractors reading tap i; the last block has `extra_extractors` more passes
        self.interactions = nn.ModuleList(
            nn.ModuleList(extractor() for _ in range(1 + (extra_extractors if i == num_taps - 1 else 0)))
            for i in range(num_taps)
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(NUM_LEVELS))
        self.add_vit_features = add_vit_features
        # False (the reference): the tapped ViT maps are added as the backbone returns them. A pretrained ViT's
        # final-norm outputs are several times the scale of the spatial prior's (DINOv2-S: token RMS ~5, channel
        # means up to ~20; random weights: ~1), so at the start they swamp its detail; True normalises each token of
        # the added maps to unit scale (a layer norm over channels, no parameters) first.
        self.vit_feature_norm = vit_feature_norm
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's init: trunc-normal linears, fan-out normal convs, Deformable-DETR attention."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, image: torch.Tensor, vit_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """image (B, 3, H, W), H and W multiples of COARSEST_STRIDE; vit_features: tapped maps (B, D, H/16, W/16)."""
        c4, c8, c16, c32 = self.spm(image)
        shapes = [tuple(c.shape[-2:]) for c in (c8, c16, c32)]
        query = torch.cat([c.flatten(2).transpose(1, 2) + self.level_embed[i]
                           for i, c in enumerate((c8, c16, c32))], dim=1)
        refs = reference_points(shapes, image.device, query.dtype)
        feat_shape = tuple(vit_features[0].shape[-2:])
        for extractors, feat in zip(self.interactions, vit_features, strict=True):
            tokens = feat.flatten(2).transpose(1, 2)
            for extractor in extractors:
                query = extractor(query, refs, tokens, feat_shape, shapes)

        bsz, _, dim = query.shape
        sizes = [h * w for h, w in shapes]
        c8, c16, c32 = [q.transpose(1, 2).reshape(bsz, dim, *s)
                        for q, s in zip(query.split(sizes, 1), shapes, strict=True)]
        c4 = self.up(c8) + c4
        levels = [c4, c8, c16, c32]
        if self.add_vit_features:
            if self.vit_feature_norm:
                vit_features = [F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2]).permute(0, 3, 1, 2)
                                for f in vit_features]
            levels = [c + F.interpolate(f, size=c.shape[-2:], mode="bilinear", align_corners=False)
                      for c, f in zip(levels, vit_features, strict=True)]
        return [norm(c) for norm, c in zip(self.norms, levels, strict=True)]

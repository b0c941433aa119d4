"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query predicts, per head, level and point, a 2-D offset around its reference point and a weight; values are
read there with bilinear ``grid_sample`` and summed with the softmax-normalised weights. Autograd gives the
backward, so it runs and trains on CPU, CUDA and MPS with no compiled extension (the reference needs a CUDA op).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def as_shape_list(spatial_shapes: list[tuple[int, int]] | torch.Tensor) -> list[tuple[int, int]]:
    """Level shapes as [(H, W), ...]; Deformable DETR passes them as an (L, 2) tensor."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return list(spatial_shapes)


def sample_and_weight(value: torch.Tensor, spatial_shapes: list[tuple[int, int]] | torch.Tensor,
                      locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Core of deformable attention.

    value: (B, sum(H*W), heads, head_dim); locations: (B, Lq, heads, levels, points, 2) in [0, 1] (x, y);
    weights: (B, Lq, heads, levels, points). Returns (B, Lq, heads * head_dim).
    """
    spatial_shapes = as_shape_list(spatial_shapes)
    bsz, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(bsz * heads, head_dim, h, w)
        start += h * w
        g = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(bsz * heads, num_queries, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads, head_dim, Lq, levels*points) weighted by (B*heads, 1, Lq, levels*points)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    w = weights.permute(0, 2, 1, 3, 4).reshape(bsz * heads, 1, num_queries, levels * points)
    out = (stacked * w).sum(-1)
    return out.view(bsz, heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Queries attend to a few learned sampling points per head and level of a multi-scale value map.

    ``value_ratio`` shrinks the value width (the reference uses 0.5 of the model width).
    """

    def __init__(self, dim: int, num_heads: int = 16, num_levels: int = 1, num_points: int = 4,
                 value_ratio: float = 0.5):
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"value width {value_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head, farther per point."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_tokens: torch.Tensor,
                spatial_shapes: list[tuple[int, int]] | torch.Tensor, level_start_index: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, C); reference_points (B or 1, Lq, levels, 2) in [0, 1] as (x, y);
        value_tokens (B, sum(H*W), C) for the levels in ``spatial_shapes`` [(H, W), ...] (a list or an (L, 2)
        tensor); ``padding_mask`` (B, sum(H*W)) marks padded value tokens. ``level_start_index`` is accepted for
        call compatibility with Deformable DETR and derived from the shapes."""
        spatial_shapes = as_shape_list(spatial_shapes)
        bsz, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_tokens)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(bsz, value_tokens.shape[1], heads, -1)
        offsets = self.sampling_offsets(query).view(bsz, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(bsz, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(bsz, num_queries, heads, levels, points)
        # offsets are in pixels of each level: normalise by (W, H)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        fp = torch.promote_types(value.dtype, torch.float32)  # sample in >= fp32, as the reference, under fp16 AMP
        out = sample_and_weight(value.to(fp), spatial_shapes, locations.to(fp), weights.to(fp))
        return self.output_proj(out)

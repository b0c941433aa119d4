"""DINOv2 backbones (patch 14, learned absolute position embedding) from Meta's files or Hugging Face folders.

The rest of the network expects ViT tokens on a 1/16 grid. A patch-14 ViT therefore sees the (padded) image resized
to 14/16 of its size, which yields exactly H/16 x W/16 tokens; its position embedding is interpolated as Meta's
DINOv2 code does (bicubic with scale factors (n + 0.1) / M, no antialiasing), so our taps equal Meta's
``get_intermediate_layers(..., reshape=True, norm=True)`` on that resized input. The forward is written out here
(patch embedding, tokens, blocks, final norm at each tap) instead of timm's ``forward_intermediates``, whose
position-embedding resampling differs from Meta's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

INTERPOLATE_OFFSET = 0.1  # Meta's DINOv2 default (hub models); HF transformers uses a different formula


def interpolate_pos_embed(patch_pos: torch.Tensor, rows: int, cols: int,
                          offset: float = INTERPOLATE_OFFSET) -> torch.Tensor:
    """Meta's DINOv2 ``interpolate_pos_encoding`` for the patch part: (1, M*M, D) -> (1, rows*cols, D)."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding of {n} patches is not square")
    if (rows, cols) == (m, m):
        return patch_pos
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    kwargs = {"scale_factor": ((rows + offset) / m, (cols + offset) / m)} if offset else {"size": (rows, cols)}
    out = F.interpolate(grid, mode="bicubic", antialias=False, **kwargs)
    if tuple(out.shape[-2:]) != (rows, cols):
        raise ValueError(f"interpolated grid {tuple(out.shape[-2:])} != {(rows, cols)}")
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(patch_pos.dtype)


def dinov2_intermediates(vit: nn.Module, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
    """Tapped blocks' patch tokens after the final norm, as (B, D, H/p, W/p) maps (Meta's reshape=True, norm=True)."""
    patch = vit.patch_embed.patch_size[0]
    rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
    tokens = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)                        # (B, rows*cols, D)
    pos = vit.pos_embed
    if vit.no_embed_class:                                            # registers: cls already holds its position
        prefix = [vit.cls_token.expand(x.shape[0], -1, -1)]
        patch_pos = pos
    else:
        prefix = [(vit.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)]
        patch_pos = pos[:, 1:]
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
    tokens = tokens + interpolate_pos_embed(patch_pos, rows, cols)
    n_prefix = sum(p.shape[1] for p in prefix)
    h = torch.cat(prefix + [tokens], dim=1)
    wanted, out = set(taps), []
    for i, block in enumerate(vit.blocks[: max(taps) + 1]):
        h = block(h)
        if i in wanted:
            normed = vit.norm(h)[:, n_prefix:]
            out.append(normed.transpose(1, 2).reshape(x.shape[0], -1, rows, cols))
    return out


def resize_to_patch_grid(x: torch.Tensor, patch: int, token_stride: int) -> torch.Tensor:
    """The image resized so a patch-``patch`` ViT yields one token per ``token_stride`` pixels (bilinear)."""
    h, w = x.shape[-2:]
    if patch == token_stride:
        return x
    size = (h // token_stride * patch, w // token_stride * patch)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


# ----------------------------------------------------------------------------------------------------------------
# Meta's DINOv2 keys <-> timm, and Hugging Face Dinov2Model keys -> Meta's
# ----------------------------------------------------------------------------------------------------------------
def meta_to_timm(sd: Mapping[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 state dict -> timm's ``vit_*_patch14[_reg4]_dinov2`` keys (timm's own conversion rules)."""
    from nnunet_dino.backbones.timm_compat import timm

    return timm().models.vision_transformer.checkpoint_filter_fn(dict(sd), vit)


_HF_RENAMES = (
    ("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"), ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("encoder.layer.", "blocks."),
    (".attention.output.dense.", ".attn.proj."), (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"), (".mlp.weights_in.", ".mlp.w12."), (".mlp.weights_out.", ".mlp.w3."),
    ("layernorm.", "norm."),
)


def hf_dinov2_to_meta(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys -> Meta's (query/key/value merged to qkv)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attention.attention.key." in k or ".attention.attention.value." in k:
            continue
        if ".attention.attention.query." in k:
            base, kind = k.split(".attention.attention.query.")
            src = f"{base}.attention.attention."
            merged = torch.cat([sd[f"{src}{p}.{kind}"] for p in ("query", "key", "value")])
            k, v = f"{base}.attention.qkv.{kind}", merged
        for old, new in _HF_RENAMES:
            k = k.replace(old, new)
        k = k.replace(".attention.qkv.", ".attn.qkv.")
        out[k] = v
    return out

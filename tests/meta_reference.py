"""An independent, plain-PyTorch DINOv3 forward written from Meta's semantics (not timm's code).

Used to check that ``build_backbone`` reproduces Meta's ``get_intermediate_layers(x, n=taps, reshape=True,
norm=True)`` for Meta-format files: patch embedding, CLS + 4 storage tokens, RoPE (base 100, patch centres
normalised per axis to [-1, 1], rotate-half, prefix tokens not rotated), LayerScale, final LayerNorm on each tap.
"""
import math

import torch
import torch.nn.functional as F


def _rotate_half(t):
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def meta_reference_features(sd, x, taps, num_heads, swiglu=False, n_prefix=5, eps=1e-5):
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    feat = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    bsz, dim, h, w = feat.shape
    tokens = feat.flatten(2).transpose(1, 2)
    cls = sd["cls_token"].expand(bsz, -1, -1) + 0 * sd["mask_token"]
    x = torch.cat([cls, sd["storage_tokens"].expand(bsz, -1, -1), tokens], dim=1)

    head_dim = dim // num_heads
    periods = sd["rope_embed.periods"]
    ch = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    cw = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(-1, 2) * 2 - 1
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).reshape(h * w, -1).tile(2)
    sin, cos = angles.sin(), angles.cos()

    def rope(t):
        pre, pat = t[..., :n_prefix, :], t[..., n_prefix:, :]
        return torch.cat([pre, pat * cos + _rotate_half(pat) * sin], dim=-2)

    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    outs = []
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        bias = sd.get(p + "attn.qkv.bias")
        if bias is not None and p + "attn.qkv.bias_mask" in sd:
            bias = bias * sd[p + "attn.qkv.bias_mask"]
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(bsz, -1, 3, num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
        att = att.transpose(1, 2).reshape(bsz, -1, dim)
        x = x + sd[p + "ls1.gamma"] * F.linear(att, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        if swiglu:
            g = F.linear(y, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])
            u = F.linear(y, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
            m = F.linear(F.silu(g) * u, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            m = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * m
        if i in taps:
            out = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps)
            outs.append(out[:, n_prefix:].transpose(1, 2).reshape(bsz, dim, h, w))
    return outs

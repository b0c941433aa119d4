"""Partial fine-tuning of the DINO backbone: LoRA on the attention projections, or the last k blocks trainable.

The frozen backbone stays the default and the reference; both options are opt-in network arguments
(``backbone_lora_rank``, ``backbone_trainable_blocks``) so the plans a model folder keeps rebuild the same network
for ``nnUNetv2_predict`` and export. Only blocks up to the last tapped one are adapted: the blocks after it never run
(``stop_early``), and a parameter that gets no gradient would break DDP. The backbone stays in eval mode (no
dropout, no RoPE jitter) while its adapted parts train; checkpoints carry only those parts, on top of the base
weights' fingerprint (see ``DinoUNet``'s state-dict hooks).

LoRA is a few lines of our own rather than ``peft``: timm's Eva and ViT blocks both expose ``attn.qkv`` and
``attn.proj`` as plain ``nn.Linear``, and ``peft`` would pull in transformers and accelerate for that.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_dino.errors import DinoUNetError


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with the base frozen (computed as one linear map with the weight
    ``W + scale * B A``); B starts at zero, so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight. timm's Eva attention with separate q/k/v biases calls
        ``F.linear(x, attn.qkv.weight, bias)`` instead of ``attn.qkv(x)``, so the update must live here."""
        delta = (self.lora_b @ self.lora_a) * self.scale
        return self.base.weight + delta.to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def merged(self) -> nn.Linear:
        """A plain Linear with the update folded in (for export and fast inference)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.double() @ self.lora_a.double()) * self.scale
            out.weight.copy_((self.base.weight.double() + delta).to(out.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        out.requires_grad_(False)
        return out


def adapted_blocks(vit: nn.Module, last_tap: int, count: int | None = None) -> list[nn.Module]:
    """The blocks to adapt: the ``count`` blocks ending at the last tapped one (all up to it when None)."""
    blocks = list(vit.blocks)[: last_tap + 1]
    if count is not None:
        if not 1 <= count <= len(blocks):
            raise DinoUNetError(f"backbone_trainable_blocks must be between 1 and {len(blocks)} (the blocks up to the "
                                f"last tapped one), got {count}.")
        blocks = blocks[-count:]
    return blocks


def add_lora(vit: nn.Module, last_tap: int, rank: int, alpha: float | None = None) -> int:
    """Wrap ``attn.qkv`` and ``attn.proj`` of every block up to the last tap; returns the trainable parameter count."""
    if rank < 1:
        raise DinoUNetError(f"backbone_lora_rank must be a positive integer, got {rank}.")
    alpha = float(alpha if alpha is not None else rank)
    count = 0
    for block in adapted_blocks(vit, last_tap):
        for name in ("qkv", "proj"):
            base = getattr(block.attn, name, None)
            if not isinstance(base, nn.Linear):
                raise DinoUNetError(f"LoRA expects attn.{name} to be nn.Linear in {type(block).__name__}, found "
                                    f"{type(base).__name__}; this backbone does not support LoRA.")
            lora = LoRALinear(base, rank, alpha)
            setattr(block.attn, name, lora)
            count += lora.lora_a.numel() + lora.lora_b.numel()
    return count


def unfreeze_last_blocks(vit: nn.Module, last_tap: int, k: int) -> int:
    """Make the k blocks ending at the last tap trainable (kept in fp32 master weights by the caller's dtype)."""
    count = 0
    for block in adapted_blocks(vit, last_tap, k):
        block.requires_grad_(True)
        count += sum(p.numel() for p in block.parameters())
    return count


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear inside ``module`` by its merged Linear; returns how many were merged."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                merged += 1
    return merged

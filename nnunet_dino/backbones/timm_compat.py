"""The one module that touches timm beyond its public model API: a quiet import and DINOv3 (Eva) internals.

Bounded by the timm versions in pyproject.toml; tests/test_backbones.py::test_timm_internals_we_rely_on fails loudly
on a timm that moves any of them (the checkpoint filter, the RoPE periods, the k-bias buffer).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from types import ModuleType

import torch
from torch import nn


def timm() -> ModuleType:
    """``import timm`` without the FutureWarning its hrnet module triggers (torch.jit.interface) at import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
        import timm as module
    return module


def assign_meta_state_dict(vit: nn.Module, sd: dict[str, torch.Tensor], meta_layout: bool) -> None:
    """Load a Meta-keyed (or timm-keyed) DINOv3 state dict into a timm Eva built on the meta device, in place."""
    from timm.models.eva import checkpoint_filter_fn

    periods = sd.get("rope_embed.periods")
    if meta_layout:
        sd = dict(sd)
        for k in [k for k in sd if k.endswith("attn.qkv.bias_mask")]:  # Meta applies bias * mask
            bias_key = k[: -len("_mask")]
            sd[bias_key] = sd[bias_key] * sd[k]
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints a note per block for bias-free models
            sd = checkpoint_filter_fn(sd, vit)
    vit.load_state_dict(sd, strict=True, assign=True)
    # Rebuild the non-persistent buffers that the meta device left empty.
    for module in vit.modules():
        if hasattr(module, "k_bias") and isinstance(getattr(module, "q_bias", None), torch.Tensor):
            module.k_bias = torch.zeros_like(module.q_bias)
    # Meta stores the RoPE periods (rounded to bf16); copying them makes timm bit-identical to Meta's model.
    set_rope_periods(vit, periods.float().clone() if periods is not None else vit.rope._compute_periods())


def rope_periods(vit: nn.Module) -> torch.Tensor:
    return vit.rope.periods


def set_rope_periods(vit: nn.Module, periods: torch.Tensor) -> None:
    vit.rope.periods = periods

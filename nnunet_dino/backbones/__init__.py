"""Frozen DINO encoders: the registry of backbones, Meta's weight files (found, hashed, read), the timm builds that
reproduce Meta's features, and the opt-in LoRA / last-k adaptation."""
from nnunet_dino.backbones.builder import (
    DinoBackbone,
    build_backbone,
    cast_vit,
    check_weight_file,
    hf_config_entry,
    resolve_weights,
)
from nnunet_dino.backbones.registry import BACKBONES, RANDOM, TOKEN_GRID, BackboneSpec, get_spec, looks_like

__all__ = ["BACKBONES", "RANDOM", "TOKEN_GRID", "BackboneSpec", "DinoBackbone", "build_backbone", "cast_vit",
           "check_weight_file", "get_spec", "hf_config_entry", "looks_like", "resolve_weights"]

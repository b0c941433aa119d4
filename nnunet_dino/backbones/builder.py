"""Frozen DINOv3 ViT backbones, built on timm and loaded from Meta's own weight files.

A registry names each backbone as Meta's hub functions do (``dinov3_vits16`` ...) and records the blocks Dino U-Net
taps. ``build_backbone`` returns a module whose forward gives the tapped layers' patch tokens normalised by the
final norm, exactly like Meta's ``get_intermediate_layers(x, n=taps, reshape=True, norm=True)``. The backbone is
frozen and never leaves eval mode: the same image always gives the same features.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nnunet_dino.backbones.dinov2 import dinov2_intermediates, meta_to_timm, resize_to_patch_grid
from nnunet_dino.backbones.registry import (
    BACKBONES,
    RANDOM,
    TOKEN_GRID,
    BackboneSpec,
    get_spec,
    looks_like,
    spec_matches,
)
from nnunet_dino.backbones.timm_compat import assign_meta_state_dict, rope_periods, set_rope_periods, timm
from nnunet_dino.backbones.weights import (
    WEIGHTS_ENV,
    describe_state_dict,
    expected_file_name,
    find_weight_files,
    read_state_dict,
    verify_file,
    weights_differ_error,
    weights_folder,
)
from nnunet_dino.errors import DinoUNetError

logger = logging.getLogger(__name__)

class DinoBackbone(nn.Module):
    """A frozen DINO ViT returning its tapped, final-norm-normalised patch tokens as NCHW maps on a 1/16 grid
    (optionally partly trainable: ``adapt``)."""

    def __init__(self, vit: nn.Module, spec: BackboneSpec, taps: Sequence[int], weights_file: str | None,
                 weights_sha256: str, autocast_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.vit = vit
        self.name = spec.name
        self.embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.family = spec.family
        self.tap_layers = tuple(int(t) for t in taps)
        self.weights_file = weights_file
        self.weights_sha256 = weights_sha256
        self.autocast_dtype = autocast_dtype
        self.adapted = False  # True once LoRA or trainable blocks are added (nnunet_dino.backbones.lora)
        self.vit.requires_grad_(False)
        self.vit.eval()

    def adapt(self, lora_rank: int = 0, lora_alpha: float | None = None, trainable_blocks: int = 0) -> int:
        """Opt-in partial fine-tuning (see nnunet_dino.backbones.lora); returns the trainable parameters added."""
        from nnunet_dino.backbones.lora import add_lora, unfreeze_last_blocks

        if not lora_rank and not trainable_blocks:
            return 0
        if lora_rank and trainable_blocks:
            raise DinoUNetError("Choose LoRA (backbone_lora_rank) or trainable blocks (backbone_trainable_blocks), "
                                "not both.")
        if trainable_blocks and next(self.vit.parameters()).dtype != torch.float32:
            raise DinoUNetError("backbone_trainable_blocks needs the backbone in float32 (updates to half-precision "
                                "weights are lost); drop backbone_dtype or use LoRA (backbone_lora_rank).")
        last = max(self.tap_layers)
        added = add_lora(self.vit, last, lora_rank, lora_alpha) if lora_rank else \
            unfreeze_last_blocks(self.vit, last, trainable_blocks)
        self.adapted = True
        return added

    def train(self, mode: bool = True) -> DinoBackbone:
        """Stay in eval mode whatever the parent does: no RoPE jitter, no dropout, deterministic features."""
        super().train(mode)
        self.vit.eval()
        return self

    def fingerprint(self) -> dict:
        """Small, primitive identity of the weights: travels in checkpoints and plans."""
        return {"backbone": self.name, "weights_sha256": self.weights_sha256, "weights_file": self.weights_file}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise DinoUNetError(
                f"The DINO backbone takes (B, 3, H, W) images, got shape {tuple(x.shape)}; map your channels to 3 "
                f"first (DinoUNet does this with its channel mixer)."
            )
        h, w = x.shape[-2:]
        if h % TOKEN_GRID or w % TOKEN_GRID:
            raise DinoUNetError(
                f"Input size {h}x{w} is not a multiple of the token grid {TOKEN_GRID}; pad the image (DinoUNet "
                f"pads it internally)."
            )
        param_dtype = next(self.vit.parameters()).dtype
        use_autocast = x.device.type == "cuda" and self.autocast_dtype is not None
        ctx = torch.autocast("cuda", dtype=self.autocast_dtype) if use_autocast else contextlib.nullcontext()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.adapted), ctx:  # frozen: no graph at all
            if self.family == "dinov2":
                feats = dinov2_intermediates(self.vit, resize_to_patch_grid(x, self.patch_size, TOKEN_GRID).to(
                    param_dtype), self.tap_layers)
            else:
                feats = self.vit.forward_intermediates(
                    x.to(param_dtype), indices=list(self.tap_layers), norm=True, output_fmt="NCHW",
                    intermediates_only=True, stop_early=True,
                )
        return [f.float() for f in feats]


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike | None) -> Path | None:
    """Turn the ``weights`` argument into a file path, or None for random initialisation."""
    if weights is None:
        if spec.random_only:
            return None
        folder = weights_folder()
        files = find_weight_files(spec.arch, folder, spec.file_naming) if folder else []
        if not files:
            where = f"folder searched: {folder}" if folder else f"{WEIGHTS_ENV} is not set"
            raise DinoUNetError(
                f"No weights found for backbone {spec.name}: put the file "
                f"{expected_file_name(spec.arch, family=spec.file_naming)} "
                f"into a folder and export {WEIGHTS_ENV}=<that folder> ({where}); it comes from {spec.weights_origin}. "
                f"Without it (architecture and cost only, accuracy meaningless): nnunet-dino plans -d DATASET "
                f"--backbone {spec.name} --weights random."
            )
        return files[0]
    if str(weights) == RANDOM:
        return None
    path = Path(weights).expanduser()
    if path.is_dir() and (path / "model.safetensors").is_file():  # a Hugging Face model folder
        return path / "model.safetensors"
    if not path.is_file():  # a bare file name (as recorded in a model folder's plans): look in the weights folder
        folder = weights_folder()
        if folder and (folder / path.name).is_file():
            return folder / path.name
        where = (f"the folder {folder} named by {WEIGHTS_ENV}" if folder
                 else f"a folder named by {WEIGHTS_ENV} (unset now)")
        raise DinoUNetError(
            f"Backbone weight file {path.name} for {spec.name} was not found at {path} nor in {where}; put that "
            f"file there (it comes from {spec.weights_origin})."
        )
    return path


def _hf_config_facts(folder: Path) -> tuple[dict, str]:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DinoUNetError(f"{folder / 'config.json'} is not readable JSON ({type(e).__name__}); restore it from the "
                            f"model's release or remove it (the weights' shapes are then checked alone).") from None
    if not isinstance(cfg, dict):
        raise DinoUNetError(f"{folder / 'config.json'} is not a Hugging Face config (a JSON object); restore it from "
                            f"the model's release or remove it.")
    kind = str(cfg.get("model_type", ""))
    facts = {"family": "dinov2" if kind.startswith("dinov2") else "dinov3", "patch": cfg.get("patch_size"),
             "embed_dim": cfg.get("hidden_size"), "depth": cfg.get("num_hidden_layers"),
             "swiglu": bool(cfg.get("use_swiglu_ffn") or cfg.get("use_gated_mlp")),
             "registers": bool(cfg.get("num_register_tokens")) and kind.startswith("dinov2"), "meta_layout": False}
    said = (f"model_type {kind}, hidden_size {facts['embed_dim']}, {facts['depth']} layers, patch {facts['patch']}, "
            f"{cfg.get('num_register_tokens', 0)} register tokens")
    return facts, said


def hf_config_entry(folder: Path) -> tuple[str | None, str]:
    """The registry entry a Hugging Face model folder's config.json describes, and that description."""
    facts, said = _hf_config_facts(folder)
    match = [s.name for s in BACKBONES.values() if not s.random_only and spec_matches(s, facts)]
    return (match[0] if match else None), said


def _check_hf_config(spec: BackboneSpec, weights_file: Path, depth: int) -> None:
    """A Hugging Face folder says what it holds in config.json: refuse another entry's folder by that."""
    folder = weights_file.parent
    if weights_file.name != "model.safetensors" or not (folder / "config.json").is_file():
        return
    facts, said = _hf_config_facts(folder)
    if not spec_matches(spec, facts, depth=depth):
        entry = hf_config_entry(folder)[0]
        what = f"looks like {entry}" if entry else "matches no registry entry"
        raise DinoUNetError(f"{folder}/config.json ({said}) {what}, not {spec.name}; ask for that backbone or use a "
                            f"folder of {spec.name}.")


def _seeded_random_vit(timm_name: str, kwargs: dict, device: torch.device | None) -> nn.Module:
    """Random ViT, identical on every machine (seeded, CPU init) so smoke models predict what they trained on."""
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return timm().create_model(timm_name, pretrained=False, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm().create_model(timm_name, pretrained=False, **kwargs)


def _load_vit_from_file(spec: BackboneSpec, path: Path, kwargs: dict) -> tuple[nn.Module, str]:
    """Build the timm model on the meta device and assign the memory-mapped tensors (no 2x RAM)."""
    _check_hf_config(spec, path, kwargs.get("depth", spec.depth))
    sha = verify_file(path)
    sd = read_state_dict(path)
    facts = describe_state_dict(sd)
    if not spec_matches(spec, facts, depth=kwargs.get("depth", spec.depth)):
        seems = looks_like(facts, BACKBONES.values())
        raise DinoUNetError(
            f"{path.name} looks like {seems}, not {spec.name}; ask for that backbone (e.g. the matching trainer) "
            f"or use {expected_file_name(spec.arch, family=spec.file_naming)} for {spec.name}."
        )
    timm_name = spec.timm_name + ("_qkvb" if facts["qkv_bias"] and spec.has_qkvb_variant else "")
    with torch.device("meta"):
        vit = timm().create_model(timm_name, pretrained=False, **kwargs)
    try:
        if spec.family == "dinov2":
            sd = dict(sd)
            sd.setdefault("mask_token", torch.zeros(1, spec.embed_dim))  # unused at inference; timm's filter keys on it
            vit.load_state_dict(meta_to_timm(sd, vit), strict=True, assign=True)
        else:
            assign_meta_state_dict(vit, sd, meta_layout=facts["meta_layout"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise DinoUNetError(
            f"{path.name} does not fit {spec.name} ({detail}); use "
            f"{expected_file_name(spec.arch, family=spec.file_naming)}."
        ) from None
    return vit, sha


def check_weight_file(name: str, weights: str | os.PathLike | None, expected_sha256: str | None = None) -> str | None:
    """Everything a load checks, without keeping the model: file found and readable, hash (name, record), variant,
    every key and shape. Returns the SHA-256 (None for random weights); raises DinoUNetError naming the fix.

    Cheap: the file is memory-mapped onto the meta device and the hash is cached."""
    spec = get_spec(name)
    path = resolve_weights(spec, weights)
    if path is None:
        return None
    _, sha = _load_vit_from_file(spec, path, spec.model_kwargs)
    if expected_sha256 and expected_sha256 != sha:
        raise weights_differ_error(spec.name, path.name, sha, expected_sha256)
    return sha


def build_backbone(name: str, weights: str | os.PathLike | None = None, *,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   autocast_dtype: torch.dtype | None = torch.bfloat16, depth: int | None = None,
                   taps: Sequence[int] | None = None) -> DinoBackbone:
    """Build a frozen DINOv3 backbone.

    ``weights``: a file path, ``"random"`` (random init; results are meaningless for accuracy) or None (find Meta's
    file in the folder named by ``nnUNet_dino_weights``). ``dtype`` casts the weights (bf16 halves 7B's memory);
    ``autocast_dtype`` is the CUDA autocast type of the forward (None: run in the weights' dtype). ``depth`` and
    ``taps`` shrink a model for tests only.
    """
    spec = get_spec(name)
    kwargs = spec.model_kwargs
    if depth is not None:
        kwargs["depth"] = depth
    taps = tuple(taps) if taps is not None else spec.taps
    if max(taps) >= kwargs.get("depth", spec.depth):
        raise DinoUNetError(f"Taps {taps} exceed the depth of {name}; choose block indices below the depth.")
    path = resolve_weights(spec, weights)
    if path is None:
        if not spec.random_only:
            logger.warning("Backbone %s uses RANDOM weights: fine for tests, meaningless for accuracy.", name)
        vit, sha, file_name = _seeded_random_vit(spec.timm_name, kwargs, device), RANDOM, None
    else:
        vit, sha = _load_vit_from_file(spec, path, kwargs)
        file_name = path.name
    target = device if device is not None and torch.device(device).type != "meta" else None
    if dtype is not None or target is not None:
        vit = cast_vit(vit, spec.family, dtype, target)
    return DinoBackbone(vit, spec, taps, file_name, sha, autocast_dtype)


def cast_vit(vit: nn.Module, family: str, dtype: torch.dtype | None, device=None) -> nn.Module:
    """Move/cast a ViT tensor by tensor (never a second full copy on the host), keeping DINOv3's RoPE math in fp32."""
    periods = rope_periods(vit) if family == "dinov3" else None
    vit = vit.to(device=device, dtype=dtype)
    if periods is not None:
        set_rope_periods(vit, periods.float().to(device))
    return vit

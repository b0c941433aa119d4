"""DinoUNet: channel mixer -> frozen DINOv3 -> adapter -> FAPM -> learned upsampling -> U-Net decoder.

Built from nnU-Net plans keyword names (``input_channels``, ``num_classes``, ``deep_supervision``, conv/norm/nonlin
ops), returns raw logits. Its ``state_dict`` holds only the trainable parts plus a small backbone fingerprint, so
checkpoints are megabytes, and loading refuses a checkpoint trained on different backbone weights. It has no method
named ``initialize`` on purpose: nnU-Net would apply it to the pretrained backbone.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_dino.backbones import build_backbone
from nnunet_dino.backbones.weights import weights_differ_error
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network.adapter import COARSEST_STRIDE, NUM_LEVELS, DinoAdapter
from nnunet_dino.network.decoder import LearnedUpsample, UNetDecoder
from nnunet_dino.network.fapm import FAPM
from nnunet_dino.network.ops import nonlin_kwargs as default_nonlin_kwargs
from nnunet_dino.network.ops import norm_kwargs as default_norm_kwargs

CHANNEL_MODES = ("learned", "reference")
# encoder_scale: the encoder sees the patch upsampled by this factor (1 = the reference). Powers of two keep every
# adapter level on an exact power-of-two multiple of the decoder's skip sizes (no bilinear resize of skips).
ENCODER_SCALES = (1, 2, 4)
BACKBONE_DTYPES = ("float32", "bfloat16", "float16")
# Inputs are padded to a multiple of the coarsest stride (see pad_to_multiple).
NETWORK_MULTIPLE = COARSEST_STRIDE


class ChannelMixer(nn.Module):
    """Learned 1x1 map from C input channels to the 3 the ViT needs; starts as repeat/average, drops nothing.

    Output k starts as the mean of inputs k, k+3, k+6, ... (or input k mod C when there are fewer than 3):
    1 channel -> repeated, 2 -> [c0, c1, c0] like the reference, 5 -> [(c0+c3)/2, (c1+c4)/2, c2].
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.mix = nn.Conv2d(in_channels, 3, 1)
        weight = torch.zeros(3, in_channels)
        for k in range(3):
            sources = list(range(k, in_channels, 3)) or [k % in_channels]
            weight[k, sources] = 1.0 / len(sources)
        with torch.no_grad():
            self.mix.weight.copy_(weight[:, :, None, None])
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)


def reference_channels(x: torch.Tensor) -> torch.Tensor:
    """The reference's fixed mapping: repeat 1 channel, [c0, c1, c0] for 2, keep the first 3 (drops the rest)."""
    c = x.shape[1]
    return x.repeat(1, 3, 1, 1) if c == 1 else x[:, [0, 1, 0]] if c == 2 else x[:, :3]


def encoder_view(rgb: torch.Tensor, scale: int) -> torch.Tensor:
    """The image the backbone and the adapter see: the patch itself (scale 1, the reference) or a bilinear
    upsampled copy, so a small patch still gives the ViT a grid of (H * scale / 16) x (W * scale / 16) tokens."""
    if scale == 1:
        return rgb
    return F.interpolate(rgb, scale_factor=float(scale), mode="bilinear", align_corners=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad bottom/right to a multiple of ``multiple``, and to two cells of it when one cell would be all.

    A single cell (e.g. 32x32 for any image up to 32 px) would leave the coarsest level 1x1, where instance norm has
    no statistics; every larger size is padded exactly as before."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if (h + ph) * (w + pw) <= COARSEST_STRIDE ** 2:
        pw += multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class DinoUNet(nn.Module):
    """Dino U-Net for 2D segmentation (see module docstring). Reference defaults throughout.

    Options beyond the reference, each with a switch back: ``channel_mode="reference"`` (fixed repeat/truncate
    instead of the learned mixer); ``pad_multiple`` (inputs of any size are padded to a multiple of 32 and the
    logits cropped back); ``backbone_lora_rank`` / ``backbone_trainable_blocks`` (None: frozen, the reference)
    fine-tune part of the backbone (``nnunet_dino.backbones.lora``); ``encoder_scale`` (1: the reference) runs the
    backbone and the adapter on the patch upsampled by 2 or 4, so the ViT sees 4x or 16x the tokens without
    re-preprocessing the dataset, while the decoder and the logits stay at the patch's own size;
    ``vit_feature_norm`` (False: the reference) normalises the tapped ViT maps per token before the adapter adds
    them to its levels (``nnunet_dino.network.adapter``).
    ``features_per_stage`` has one width per pyramid level (4); stock plans are converted to this block by
    ``nnunet_dino.nnunet.plans.dino_architecture``.
    """

    def __init__(self, input_channels: int, num_classes: int, backbone: str = "dinov3_vits16",
                 backbone_weights: str | os.PathLike | None = None,
                 features_per_stage: Sequence[int] = (32, 64, 128, 256),
                 deep_supervision: bool = False, conv_op: type = nn.Conv2d, conv_bias: bool = True,
                 norm_op: type | None = nn.InstanceNorm2d, norm_op_kwargs: dict | None = None,
                 dropout_op: type | None = None, dropout_op_kwargs: dict | None = None,
                 nonlin: type | None = nn.LeakyReLU, nonlin_kwargs: dict | None = None,
                 n_conv_per_stage_decoder: int | Sequence[int] = 2, decoder_kernel_size: int = 3,
                 spm_channels: int = 64, deform_num_heads: int = 16, deform_num_points: int = 4,
                 deform_value_ratio: float = 0.5, ffn_ratio: float = 0.25, drop_path_rate: float = 0.3,
                 extra_extractors: int = 2, add_vit_features: bool = True, checkpoint_extractors: bool = True,
                 fapm_rank: int = 256, channel_mode: str = "learned", pad_multiple: int = NETWORK_MULTIPLE,
                 backbone_autocast: bool = True, backbone_weights_sha256: str | None = None,
                 backbone_dtype: str | None = None, backbone_lora_rank: int | None = None,
                 backbone_lora_alpha: float | None = None, backbone_trainable_blocks: int | None = None,
                 encoder_scale: int = 1, vit_feature_norm: bool = False):
        super().__init__()
        if conv_op is not nn.Conv2d:
            raise DinoUNetError(f"Dino U-Net is 2D only (got conv_op {getattr(conv_op, '__name__', conv_op)}); "
                                f"train the '2d' configuration.")
        if channel_mode not in CHANNEL_MODES:
            raise DinoUNetError(f"channel_mode '{channel_mode}' is unknown; valid choices: {', '.join(CHANNEL_MODES)}.")
        if int(input_channels) < 1:
            raise DinoUNetError(f"input_channels must be at least 1, got {input_channels}; check dataset.json's "
                                f"channel_names.")
        if len(features_per_stage) != NUM_LEVELS:
            raise DinoUNetError(f"features_per_stage needs {NUM_LEVELS} entries (e.g. 32, 64, 128, 256), got "
                                f"{list(features_per_stage)}.")
        if backbone_dtype not in (None, *BACKBONE_DTYPES):
            raise DinoUNetError(f"backbone_dtype '{backbone_dtype}' is unknown; valid choices: "
                                f"{', '.join(BACKBONE_DTYPES)}.")
        if encoder_scale not in ENCODER_SCALES:
            raise DinoUNetError(f"encoder_scale {encoder_scale!r} is unknown; valid choices: "
                                f"{', '.join(map(str, ENCODER_SCALES))} (the ViT sees scale x scale times the tokens).")
        self.encoder_scale = int(encoder_scale)
        features = [int(f) for f in features_per_stage]
        norm_op_kwargs, nonlin_kwargs = default_norm_kwargs(norm_op_kwargs), default_nonlin_kwargs(nonlin_kwargs)
        self.pad_multiple = max(NETWORK_MULTIPLE, int(pad_multiple))
        self.channel_mode = channel_mode
        self.input_channels = int(input_channels)

        self.channel_mixer = ChannelMixer(input_channels) if input_channels != 3 and channel_mode == "learned" else None
        self.backbone = build_backbone(backbone, backbone_weights,
                                       dtype=getattr(torch, backbone_dtype) if backbone_dtype else None,
                                       autocast_dtype=torch.bfloat16 if backbone_autocast else None)
        if backbone_weights_sha256 and backbone_weights_sha256 != self.backbone.weights_sha256:
            raise weights_differ_error(backbone, self.backbone.weights_file, self.backbone.weights_sha256,
                                       backbone_weights_sha256)
        # opt-in partial fine-tuning (LoRA or the last k blocks; nnunet_dino.backbones.lora), before the DDP ignore list
        self.backbone.adapt(int(backbone_lora_rank or 0), backbone_lora_alpha, int(backbone_trainable_blocks or 0))
        dim = self.backbone.embed_dim
        self.adapter = DinoAdapter(
            dim, num_taps=len(self.backbone.tap_layers), spm_channels=spm_channels, num_heads=deform_num_heads,
            num_points=deform_num_points, value_ratio=deform_value_ratio, ffn_ratio=ffn_ratio,
            drop_path=drop_path_rate, extra_extractors=extra_extractors, add_vit_features=add_vit_features,
            use_checkpoint=checkpoint_extractors, vit_feature_norm=bool(vit_feature_norm))
        self.fapm = FAPM(dim, features, rank=fapm_rank, conv_bias=conv_bias, norm_op=norm_op,
                         norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        # the adapter's levels sit at (4 / encoder_scale)x below the skips: 2 doublings (reference), 1, or none
        self.upsample = (nn.ModuleList(LearnedUpsample(f, conv_bias) for f in features)
                         if self.encoder_scale < 4 else None)
        self.decoder = UNetDecoder(
            features, num_classes, n_conv_per_stage=n_conv_per_stage_decoder, conv_op=conv_op,
            kernel_size=decoder_kernel_size, conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
            dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
            deep_supervision=deep_supervision)
        # DDP: the frozen backbone is identical on every rank (same file, or the same seeded init), so do not
        # broadcast it (tens of GB for 7B); its trainable parts (LoRA, last blocks) are synchronised like the rest.
        # Names are relative to this module; with torch.compile they would not match.
        self.trainable_backbone_keys = frozenset(
            f"backbone.{n}" for n, p in self.backbone.named_parameters() if p.requires_grad)
        self._ddp_params_and_buffers_to_ignore = [
            f"backbone.{n}" for n, p in self.backbone.named_parameters() if not p.requires_grad] + [
            f"backbone.{n}" for n, _ in self.backbone.named_buffers()]
        self._register_state_dict_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_accept_missing_backbone_keys)

    # --- the forward pass, in the order of the paper's figure ---------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.checked_input(x)
        height, width = x.shape[-2:]
        out = self.segment(pad_to_multiple(x, self.pad_multiple))
        if isinstance(out, list):
            return [o[..., : -(-height // 2**i), : -(-width // 2**i)] for i, o in enumerate(out)]
        return out[..., :height, :width]

    def segment(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The network proper, in the order of the paper's figure, on an input already padded to a multiple of 32
        (also what ``nnunet-dino export`` traces: no data-dependent checks)."""
        rgb = self.to_rgb(x)
        seen = encoder_view(rgb, self.encoder_scale)          # what the encoder sees: the patch, or it upsampled
        vit_features = self.backbone(seen)                    # frozen DINOv3, tapped layers at 1/16, no grad
        levels = self.adapter(seen, vit_features)             # D channels at 1/4, 1/8, 1/16, 1/32 of `seen`
        projected = self.fapm(levels)                         # 32, 64, 128, 256 channels
        if self.upsample is None:                             # encoder_scale 4: the levels are the skip sizes
            return self.decoder(projected)
        full = rgb.shape[-2:]
        skips = [up(p, (full[0] >> i, full[1] >> i))
                 for i, (up, p) in enumerate(zip(self.upsample, projected, strict=True))]
        return self.decoder(skips)                            # skips at H, H/2, H/4, H/8 of the patch

    def checked_input(self, x: torch.Tensor) -> torch.Tensor:
        """Refuse what would give a silently wrong result; cast other dtypes to the network's."""
        if x.ndim != 4:
            hint = "; add a batch dimension (x[None])" if x.ndim == 3 else ""
            raise DinoUNetError(f"DinoUNet takes a batch of 2-D images (B, C, H, W), got shape {tuple(x.shape)}{hint}.")
        if x.shape[1] != self.input_channels:
            raise DinoUNetError(
                f"This model was built for {self.input_channels} input channel(s) but got {x.shape[1]}; give it the "
                f"channels it was trained with (dataset.json channel_names), in the same order.")
        dtype = self.fapm.shared_basis.weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise DinoUNetError(
                f"The input holds {bad} NaN/Inf value(s) and would turn every output into NaN; under nnU-Net they come "
                f"from the image being processed (the case named in the lines above): fix or exclude that image.")
        return x

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_mixer is not None:
            return self.channel_mixer(x)
        return x if x.shape[1] == 3 else reference_channels(x)

    # --- small checkpoints ------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"format": 1, **self.backbone.fingerprint()}

    def set_extra_state(self, state: dict) -> None:
        mine = self.backbone.fingerprint()
        if state.get("backbone") != mine["backbone"]:
            raise DinoUNetError(
                f"This checkpoint was trained with backbone {state.get('backbone')} but the network was built with "
                f"{mine['backbone']}; use the trainer/plans of that backbone."
            )
        if state.get("weights_sha256") != mine["weights_sha256"]:
            raise weights_differ_error(mine["backbone"], mine["weights_file"], mine["weights_sha256"],
                                       state.get("weights_sha256"), state.get("weights_file"))

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per paper box (the reference counts: S 6.20 M = 3.70 + 1.39 + 0.35 + 0.76)."""
        def count(m):
            return sum(p.numel() for p in m.parameters() if p.requires_grad) if m is not None else 0
        parts = {"backbone_adapted": count(self.backbone), "channel_mixer": count(self.channel_mixer),
                 "adapter": count(self.adapter),
                 "fapm": count(self.fapm), "upsampling": count(self.upsample), "decoder": count(self.decoder)}
        parts["total"] = sum(parts.values())
        parts["frozen_backbone"] = sum(p.numel() for p in self.backbone.parameters() if not p.requires_grad)
        return parts


def _drop_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """Frozen backbone weights are rebuilt from their file; only its trained parts (if any) travel."""
    keep = {prefix + k for k in module.trainable_backbone_keys}
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.") and k not in keep]:
        del state_dict[key]


def _accept_missing_backbone_keys(module: nn.Module, incompatible_keys) -> None:
    """The frozen backbone is rebuilt from its weight file, not from the checkpoint; deep-supervision heads of a
    checkpoint trained with them are not needed by a model built without (inference)."""
    missing, unexpected = incompatible_keys.missing_keys, incompatible_keys.unexpected_keys
    trained = module.trainable_backbone_keys  # LoRA factors / trained blocks must come from the checkpoint
    for key in [k for k in missing if "backbone." in k and "backbone." + k.split("backbone.", 1)[1] not in trained
                and (k.startswith("backbone.") or ".backbone." in k)]:
        missing.remove(key)
    if module.decoder.aux_heads is None:
        for key in [k for k in unexpected if "decoder.aux_heads." in k]:
            unexpected.remove(key)

"""Meta-format DINOv3 checkpoints with random, non-trivial values, for tests and benchmarks.

Real DINOv3 weights are licence-gated, so tests write files with Meta's exact key names and shapes
(``storage_tokens``, ``rope_embed.periods`` rounded to bf16, ``qkv.bias_mask``, LayerScale ``gamma`` ...) and load
them through the public path. Values are random but not degenerate: LayerScale near 0.1-0.6 instead of 1e-5, so
every block really changes the features.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from nnunet_dino.backbones.builder import _seeded_random_vit
from nnunet_dino.backbones.registry import BACKBONES, get_spec
from nnunet_dino.backbones.weights import file_sha256, meta_file_name

_LOCAL_CLS_NORM = {"dinov3_vit7b16"}  # Meta's 7B (and SAT-493M L) files carry this training-only norm


def _nontrivial_(state: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        if "gamma" in k:
            v.copy_(torch.rand(v.shape, generator=gen) * 0.5 + 0.1)
        elif ("norm" in k) and k.endswith("weight"):
            v.copy_(1 + 0.4 * (torch.rand(v.shape, generator=gen) - 0.5))
        elif k.endswith("bias"):
            v.copy_(0.05 * torch.randn(v.shape, generator=gen))
        elif k in ("cls_token", "reg_token"):
            v.copy_(torch.randn(v.shape, generator=gen))
        elif v.ndim >= 2:
            fan_in = math.prod(v.shape[1:])
            v.copy_(torch.randn(v.shape, generator=gen) / math.sqrt(fan_in))


def meta_rope_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """Meta's RoPE periods: base ** (2 i / (head_dim / 2)) for i < head_dim / 4 (stored rounded to bf16)."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def meta_state_dict(name: str, *, seed: int = 0, depth: int | None = None, qkv_bias: bool = False,
                    sat: bool = False, periods_bf16: bool = True, device: str | None = None) -> dict[str, torch.Tensor]:
    """A random state dict with the key names, shapes and dtypes of Meta's released file for ``name``.

    ``device="meta"`` gives the layout only (no memory), e.g. to write a 27 GB 7B file chunk by chunk.
    """
    spec = get_spec(name)
    kwargs = spec.model_kwargs
    if depth is not None:
        kwargs["depth"] = depth
    timm_name = spec.timm_name + ("_qkvb" if qkv_bias and spec.has_qkvb_variant else "")
    vit = _seeded_random_vit(timm_name, kwargs, device)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    if device != "meta":
        _nontrivial_(state, gen)
    dim = spec.embed_dim
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("attn.q_bias"):
            v_bias = state[k.replace("q_bias", "v_bias")]
            k_bias = 0.05 * torch.randn(dim, generator=gen) if device != "meta" else torch.zeros_like(v)
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, k_bias, v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if spec.swiglu:
            k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3")
        out[k] = v
        if k.endswith("attn.qkv.weight") and not qkv_bias and spec.qkv_bias_keys:
            out[k.replace("weight", "bias")] = torch.zeros(3 * dim)  # released files: zero bias, zero mask
            out[k.replace("weight", "bias_mask")] = torch.zeros(3 * dim)
    out["mask_token"] = torch.zeros(1, dim)
    periods = meta_rope_periods(spec.embed_dim // spec.num_heads)
    out["rope_embed.periods"] = periods.to(torch.bfloat16) if periods_bf16 else periods
    if sat or name in _LOCAL_CLS_NORM:
        out["local_cls_norm.weight"] = torch.ones(dim)
        out["local_cls_norm.bias"] = torch.zeros(dim)
    return out


def meta_dinov2_state_dict(name: str, *, seed: int = 0, depth: int | None = None) -> dict[str, torch.Tensor]:
    """A random state dict in Meta's DINOv2 layout (``dinov2_vit*14[_reg4]_pretrain.pth``): cls_token and a
    37x37+1 pos_embed, register_tokens for the _reg entries, mask_token, w12/w3 for the SwiGLU giant."""
    spec = get_spec(name)
    kwargs = {**spec.model_kwargs, **({"depth": depth} if depth is not None else {})}
    vit = _seeded_random_vit(spec.timm_name, kwargs, None)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    _nontrivial_(state, gen)
    state["pos_embed"].copy_(0.5 * torch.randn(state["pos_embed"].shape, generator=gen))
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if spec.swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    if "reg_token" in out:  # timm folds the cls position into cls_token; Meta keeps one pos_embed for cls + patches
        pos_cls = 0.5 * torch.randn(1, 1, spec.embed_dim, generator=gen)
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = out["cls_token"] - pos_cls
        out["pos_embed"] = torch.cat([pos_cls, out["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, spec.embed_dim)
    return out


def write_meta_checkpoint(name: str, folder: str | os.PathLike, *, dataset: str = "lvd1689m",
                          with_hash: bool = True, **kwargs) -> Path:
    """Write a random Meta-format file under Meta's own name (``dinov3_<arch>_pretrain_<dataset>-<hash>.pth``;
    DINOv2: ``dinov2_<arch>_pretrain.pth``, whose names carry no hash)."""
    spec = BACKBONES[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{spec.arch}.partial"
    if spec.family == "dinov2":
        torch.save(meta_dinov2_state_dict(name, **kwargs), tmp)
        with_hash = False
    else:
        torch.save(meta_state_dict(name, sat=dataset == "sat493m", **kwargs), tmp)
    sha = file_sha256(tmp, use_cache=False)
    final = folder / meta_file_name(spec.arch, dataset, sha if with_hash else None, family=spec.file_naming)
    os.replace(tmp, final)
    return final


def make_synthetic_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, num_cases: int = 24,
                           channels: int = 1, seed: int = 0, test_cases: int = 4) -> Path:
    """A small 2-D nnU-Net raw dataset: a bright disc (label 1) and a dark square (label 2) on noise.

    Sizes vary between 64 and 128 px (not all multiples of 32); ``channels`` is 1 (grey PNG) or 3 (RGB PNG).
    Extra ``test_cases`` go to imagesTs/labelsTs for held-out Dice.
    """
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(raw_root) / f"Dataset{dataset_id:03d}_Synthetic{channels}ch"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(num_cases + test_cases):
        h, w = (int(v) for v in rng.integers(64, 129, size=2))
        yy, xx = np.mgrid[:h, :w]
        label = np.zeros((h, w), np.uint8)
        cy, cx, r = rng.integers(16, h - 16), rng.integers(16, w - 16), rng.integers(8, 15)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        sy, sx, s = rng.integers(0, h - 26), rng.integers(0, w - 26), rng.integers(14, 26)
        label[sy:sy + s, sx:sx + s] = 2
        image = 110 + 25 * rng.standard_normal((h, w, channels))
        image[label == 1] += 80
        image[label == 2] -= 90
        image = np.clip(image, 0, 255).astype(np.uint8)
        split = "Tr" if i < num_cases else "Ts"
        case = f"case_{i:03d}"
        Image.fromarray(image[..., 0] if channels == 1 else image).save(root / f"images{split}" / f"{case}_0000.png")
        Image.fromarray(label).save(root / f"labels{split}" / f"{case}.png")
    names = {"0": "grey"} if channels == 1 else {"0": "R", "1": "G", "2": "B"}
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": names, "labels": {"background": 0, "disc": 1, "square": 2},
        "numTraining": num_cases, "file_ending": ".png",
    }, indent=2))
    return root


def make_synthetic_volume_dataset(raw_root: str | os.PathLike, dataset_id: int = 993, num_cases: int = 6,
                                  test_cases: int = 2, seed: int = 0) -> Path:
    """A small 3-D NIfTI dataset (anisotropic 3 x 0.8 x 0.8 mm, a bright ellipsoid = label 1) for the 2d
    configuration of volumetric data: nnU-Net slices it, Dino U-Net trains on the slices."""
    import json

    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    root = Path(raw_root) / f"Dataset{dataset_id:03d}_SyntheticVolumes"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[:20, :72, :80]
    for i in range(num_cases + test_cases):
        cy, cx = rng.integers(24, 48), rng.integers(24, 56)
        label = (((y - cy) ** 2 + (x - cx) ** 2) / rng.integers(120, 300) + ((z - 10) / 6.0) ** 2 < 1)
        image = 100 + 20 * rng.standard_normal(label.shape) + 80 * label
        split = "Tr" if i < num_cases else "Ts"
        for arr, name in ((image.astype(np.float32), f"images{split}/vol_{i:02d}_0000.nii.gz"),
                          (label.astype(np.uint8), f"labels{split}/vol_{i:02d}.nii.gz")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.8, 0.8, 3.0))
            sitk.WriteImage(img, str(root / name))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "ellipsoid": 1},
        "numTraining": num_cases, "file_ending": ".nii.gz"}, indent=2))
    return root


# A stock PlainConvUNet 2d architecture block and plans, as nnU-Net writes them
STOCK_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512],
                    "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 5,
                    "strides": [[1, 1]] + [[2, 2]] * 4, "n_conv_per_stage": [2] * 5,
                    "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def stock_plans() -> dict:
    """nnU-Net 2.8.1 2d plans as nnUNetv2_plan_and_preprocess writes them for a 256x256 single-channel dataset."""
    cfg = {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
           "patch_size": [100, 150], "median_image_size_in_voxels": [256.0, 256.0], "spacing": [0.8, 0.8],
           "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
           "architecture": copy.deepcopy(STOCK_ARCH), "batch_dice": True}
    return {"dataset_name": "Dataset990_X", "plans_name": "nnUNetPlans", "configurations": {"2d": cfg},
            "image_reader_writer": "NaturalImage2DIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "original_median_spacing_after_transp": [999, 0.8, 0.8], "label_manager": "LabelManager",
            "original_median_shape_after_transp": [1, 256, 256], "experiment_planner_used": "ExperimentPlanner",
            "foreground_intensity_properties_per_channel": {}}

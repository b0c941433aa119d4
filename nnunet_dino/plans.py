"""Plans for Dino U-Net: the architecture block derived from any 2d plans, presets, and the plans writer.

Everything that shapes the network must come from the plans (or trainer class constants), because
``nnUNetv2_predict`` rebuilds the network from the model folder's plans.json in a fresh process. This module turns a
stock PlainConvUNet 2d architecture (or one of our presets) into a DinoUNet architecture block and writes drop-in
plans files next to ``nnUNetPlans.json`` for ``nnUNetv2_train ... -p <name>``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Sequence

from nnunet_dino.errors import DinoUNetError

DINO_CLASS = "nnunet_dino.network.DinoUNet"
OP_KEYS = ("conv_op", "norm_op", "dropout_op", "nonlin")
_STOCK_ONLY_KEYS = ("n_stages", "kernel_sizes", "strides", "n_conv_per_stage")
PATCH_MULTIPLE = 32


def round_patch_size(patch_size: Sequence[int], multiple: int = PATCH_MULTIPLE) -> list[int]:
    """Each axis up to a multiple of 32 (the adapter's 1/32 level and the ViT's 16-px patches need it)."""
    return [max(multiple, int(math.ceil(p / multiple) * multiple)) for p in patch_size]


def dino_architecture(arch: dict, backbone: str | None) -> dict:
    """A DinoUNet architecture block (class name, kwargs with string ops, imports) from any 2d plans architecture.

    A stock PlainConvUNet/ResEnc block donates its ops, conv bias and the first four feature widths; a DinoUNet
    block is kept as it is. ``backbone`` (the trainer's) must agree with a backbone named in the plans.
    """
    kwargs = dict(arch.get("arch_kwargs", {}))
    if arch.get("network_class_name") == DINO_CLASS:
        planned = kwargs.get("backbone", "dinov3_vits16")
        if backbone is not None and planned != backbone:
            raise DinoUNetError(
                f"These plans are for backbone {planned} but the trainer uses {backbone}; train with the trainer "
                f"of {planned} or write plans for {backbone} (nnunet-dino plans --preset ...)."
            )
        kwargs["backbone"] = planned
    else:
        conv = kwargs.get("conv_op", "torch.nn.modules.conv.Conv2d")
        if "3d" in str(conv).lower():
            raise DinoUNetError("Dino U-Net is 2D only: train the '2d' configuration (nnUNetv2_train D 2d FOLD -tr ...).")
        features = list(kwargs.get("features_per_stage", (32, 64, 128, 256)))[:4]
        decoder_convs = kwargs.get("n_conv_per_stage_decoder", 2)
        if not isinstance(decoder_convs, int):
            decoder_convs = list(decoder_convs)[-3:]
        kwargs = {
            "backbone": backbone or "dinov3_vits16",
            "features_per_stage": features if len(features) == 4 else [32, 64, 128, 256],
            "conv_op": "torch.nn.modules.conv.Conv2d",
            "conv_bias": kwargs.get("conv_bias", True),
            "norm_op": kwargs.get("norm_op", "torch.nn.modules.instancenorm.InstanceNorm2d"),
            "norm_op_kwargs": kwargs.get("norm_op_kwargs", {"eps": 1e-5, "affine": True}),
            "dropout_op": kwargs.get("dropout_op"),
            "dropout_op_kwargs": kwargs.get("dropout_op_kwargs"),
            "nonlin": kwargs.get("nonlin", "torch.nn.LeakyReLU"),
            "nonlin_kwargs": kwargs.get("nonlin_kwargs", {"inplace": True}),
            "n_conv_per_stage_decoder": decoder_convs,
        }
    for key in _STOCK_ONLY_KEYS:
        kwargs.pop(key, None)
    return {"network_class_name": DINO_CLASS, "arch_kwargs": kwargs,
            "_kw_requires_import": [k for k in OP_KEYS if kwargs.get(k) is not None]}


# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("nnunet_dino.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        raise DinoUNetError(f"Unknown plans preset '{name}'; valid choices: {', '.join(names)}.")
    return json.loads(resources.files("nnunet_dino.presets").joinpath(f"{name}.json").read_text())


def atomic_write_json(data: dict, path: Path) -> None:
    """Write JSON via a temp file + rename: never a half-written plans file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=4, sort_keys=False)
    os.replace(tmp, path)


def make_plans(stock: dict, preset: dict, plans_name: str) -> tuple[dict, bool]:
    """Derive a Dino U-Net plans dict from stock ``nnUNetPlans``; returns (plans, needs_new_preprocessing)."""
    if "2d" not in stock.get("configurations", {}):
        raise DinoUNetError("The stock plans have no '2d' configuration; run nnUNetv2_plan_and_preprocess -c 2d first.")
    plans = copy.deepcopy(stock)
    plans["plans_name"] = plans_name
    cfg = plans["configurations"]["2d"]
    preset_kwargs = preset["architecture"]["arch_kwargs"]
    arch = dino_architecture(cfg["architecture"], preset_kwargs["backbone"])  # ops, norm, nonlin from the plans
    arch["arch_kwargs"].update(preset_kwargs)
    cfg["architecture"] = arch
    needs_preprocessing = False
    target = preset.get("target_shape")
    if target:  # the reference's high-resolution recipe: the median image resampled to target_shape
        median_shape = cfg["median_image_size_in_voxels"][-2:]
        spacing = [s * m / t for s, m, t in zip(cfg["spacing"][-2:], median_shape, target)]
        if any(abs(a - b) > 1e-6 * max(abs(b), 1e-12) for a, b in zip(spacing, cfg["spacing"][-2:])):
            cfg["spacing"] = spacing
            cfg["median_image_size_in_voxels"] = [float(t) for t in target]
            cfg["data_identifier"] = f"{plans_name}_2d"
            needs_preprocessing = True
    cfg["patch_size"] = round_patch_size(preset.get("patch_size") or cfg["patch_size"])
    if preset.get("batch_size"):
        cfg["batch_size"] = int(preset["batch_size"])
    return plans, needs_preprocessing


def write_plans(dataset: str | int, preset: str = "dinounet_s", plans_name: str | None = None) -> tuple[Path, bool]:
    """Write ``<plans_name>.json`` next to the dataset's ``nnUNetPlans.json``; returns (path, needs_preprocessing)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise DinoUNetError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    spec = load_preset(preset)
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise DinoUNetError(f"Dataset {dataset} is not in nnUNet_raw/nnUNet_preprocessed; run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset} -c 2d first.") from None
    stock_file = Path(preprocessed) / name / "nnUNetPlans.json"
    if not stock_file.is_file():
        raise DinoUNetError(f"{stock_file} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} -c 2d first.")
    plans_name = plans_name or f"nnUNetPlans_{preset}"
    if plans_name == "nnUNetPlans":
        raise DinoUNetError("--plans-name nnUNetPlans would overwrite the stock plans; choose another name.")
    plans, needs_preprocessing = make_plans(json.loads(stock_file.read_text()), spec, plans_name)
    target = stock_file.with_name(f"{plans_name}.json")
    atomic_write_json(plans, target)
    return target, needs_preprocessing

"""Plans for Dino U-Net: the architecture block derived from any 2d plans, presets, and the plans writer.

Everything that shapes the network must come from the plans (or trainer class constants), because
``nnUNetv2_predict`` rebuilds the network from the model folder's plans.json in a fresh process. This module turns a
stock PlainConvUNet 2d architecture (or one of our presets) into a DinoUNet architecture block and writes drop-in
plans files next to ``nnUNetPlans.json`` for ``nnUNetv2_train ... -p <name>``.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.files import atomic_write_json, read_json_object
from nnunet_dino.network.ops import DEFAULT_OPS, OP_KEYS, nonlin_kwargs, norm_kwargs
from nnunet_dino.nnunet.allowlist import check_op_name

DINO_CLASS = "nnunet_dino.network.DinoUNet"
# Keys of a stock PlainConvUNet/ResEnc block that describe its CNN encoder; Dino U-Net has none.
_STOCK_ONLY_KEYS = ("n_stages", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage")
# DinoUNet constructor arguments that never belong in plans (nnU-Net passes the first three; ops are strings there)
_NOT_PLANNED = ("input_channels", "num_classes", "deep_supervision", *OP_KEYS)


def round_patch_size(patch_size: Sequence[int], multiple: int | None = None) -> list[int]:
    """Each axis up to the network's multiple (32: the adapter's 1/32 level and the ViT's 16-px patches need it)."""
    if multiple is None:
        from nnunet_dino.network import NETWORK_MULTIPLE as multiple
    return [max(multiple, int(math.ceil(p / multiple) * multiple)) for p in patch_size]


def network_defaults() -> dict:
    """DinoUNet's constructor defaults for every plannable keyword (what a preset's overrides are merged onto)."""
    from nnunet_dino.network import DinoUNet

    params = inspect.signature(DinoUNet.__init__).parameters
    return {k: copy.deepcopy(p.default) for k, p in params.items()
            if k != "self" and k not in _NOT_PLANNED and p.default is not inspect.Parameter.empty
            and not k.endswith("_kwargs")}


def dino_architecture(arch: dict) -> dict:
    """A DinoUNet architecture block (class name, kwargs with string ops, imports) from any 2d plans architecture.

    A stock PlainConvUNet/ResEnc block donates its ops, conv bias, the first four feature widths and the last three
    decoder conv counts; a DinoUNet block is kept as it is. Stock-only keys are dropped here and nowhere else; op
    import paths are checked against the allow-list (torch.nn classes only).
    """
    kwargs = copy.deepcopy(dict(arch.get("arch_kwargs", {})))
    if arch.get("network_class_name") != DINO_CLASS:
        conv = kwargs.get("conv_op", DEFAULT_OPS["conv_op"])
        if "3d" in str(conv).lower():
            raise DinoUNetError("Dino U-Net is 2D only: train the '2d' configuration "
                                "(nnUNetv2_train D 2d FOLD -tr ...).")
        features = list(kwargs.get("features_per_stage", ()))[:4]
        decoder_convs = kwargs.get("n_conv_per_stage_decoder", 2)
        if not isinstance(decoder_convs, int):
            decoder_convs = list(decoder_convs)[-3:]
            decoder_convs = decoder_convs if len(decoder_convs) == 3 else 2
        kwargs = {
            "features_per_stage": features if len(features) == 4 else network_defaults()["features_per_stage"],
            "conv_op": DEFAULT_OPS["conv_op"],
            "conv_bias": kwargs.get("conv_bias", True),
            "norm_op": kwargs.get("norm_op", DEFAULT_OPS["norm_op"]),
            "norm_op_kwargs": norm_kwargs(kwargs.get("norm_op_kwargs")),
            "dropout_op": kwargs.get("dropout_op"),
            "dropout_op_kwargs": kwargs.get("dropout_op_kwargs"),
            "nonlin": kwargs.get("nonlin", DEFAULT_OPS["nonlin"]),
            "nonlin_kwargs": nonlin_kwargs(kwargs.get("nonlin_kwargs")),
            "n_conv_per_stage_decoder": decoder_convs,
        }
    for key in _STOCK_ONLY_KEYS:
        kwargs.pop(key, None)
    for key in OP_KEYS:
        check_op_name(key, kwargs.get(key))
    if isinstance(kwargs.get("features_per_stage"), (list, tuple)):
        kwargs["features_per_stage"] = list(kwargs["features_per_stage"])
    return {"network_class_name": DINO_CLASS, "arch_kwargs": kwargs,
            "_kw_requires_import": [k for k in OP_KEYS if kwargs.get(k) is not None]}


def apply_trainer_pins(block: dict, pins: dict, trainer: str) -> dict:
    """The one rule between trainer constants and plans: a constant that is set (not None) is a pin.

    A pin fills a value the plans leave open and must agree with a value the plans name; a contradiction is refused
    (silently preferring either side would train or predict a model other than the one asked for).
    """
    kwargs = block["arch_kwargs"]
    for key, value in pins.items():
        if value is None:
            continue
        planned = kwargs.get(key)
        if planned is None:
            kwargs[key] = value
        elif str(planned) != str(value):
            if key == "backbone":
                from nnunet_dino.backbones.registry import trainer_for

                raise DinoUNetError(
                    f"These plans are for backbone {planned} but {trainer} pins {value}; train them with "
                    f"nnUNetTrainerDinoUNet (it follows the plans' backbone) or {trainer_for(planned)}, or write "
                    f"plans for {value}: nnunet-dino plans -d DATASET --backbone {value}."
                )
            raise DinoUNetError(
                f"These plans are for {key} {planned} but {trainer} pins {value}; train them with a trainer that "
                f"does not pin {key} (e.g. nnUNetTrainerDinoUNet), or write plans with {key} {value}."
            )
    return block


# --------------------------------------------------------------------------------------------------------------
# recipes: each JSON in plans/ holds only what differs beyond the backbone (resolution, patch, network overrides);
# the backbone comes from --backbone (the registry). Today's per-backbone preset names stay as aliases.
# --------------------------------------------------------------------------------------------------------------
PRESET_PACKAGE = "nnunet_dino.plans_presets"
_RECIPE_KEYS = ("description", "target_shape", "patch_size", "batch_size", "arch_kwargs")
DEFAULT_RECIPE = "stock"
ALIASES = {  # preset name -> (backbone, recipe)
    "dinounet_s": ("dinov3_vits16", "stock"), "dinounet_s_512": ("dinov3_vits16", "hires512"),
    "dinounet_splus": ("dinov3_vits16plus", "stock"), "dinounet_b": ("dinov3_vitb16", "stock"),
    "dinounet_b_512": ("dinov3_vitb16", "hires512"), "dinounet_l": ("dinov3_vitl16", "stock"),
    "dinounet_hplus": ("dinov3_vith16plus", "stock"), "dinounet_7b": ("dinov3_vit7b16", "stock"),
    "dinounet_meddinov3_b": ("meddinov3_vitb16_ct3m", "stock"),
    **{f"dinounet_dinov2_{size}{reg}": (f"dinov2_vit{size}14{reg}", "stock")
       for size in "sblg" for reg in ("", "_reg")},
}


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".json"))


def preset_names() -> list[str]:
    """Every name --preset takes: the recipes, then the aliases (a backbone with a recipe)."""
    return recipe_names() + sorted(ALIASES)


def load_recipe(name: str) -> dict:
    """A recipe's overrides, checked: known keys only, arch_kwargs only DinoUNet's plannable keywords."""
    names = recipe_names()
    if name not in names:
        raise DinoUNetError(f"Unknown plans preset '{name}'; valid choices: {', '.join(preset_names())}.")
    recipe = json.loads(resources.files(PRESET_PACKAGE).joinpath(f"{name}.json").read_text())
    unknown = set(recipe) - set(_RECIPE_KEYS)
    if unknown:
        raise DinoUNetError(f"Preset {name} has unknown keys {sorted(unknown)}; valid: {', '.join(_RECIPE_KEYS)} "
                            f"(the backbone is chosen with --backbone).")
    defaults = network_defaults()
    bad = set(recipe.get("arch_kwargs", {})) - set(defaults)
    if bad:
        raise DinoUNetError(f"Preset {name} overrides unknown network keywords {sorted(bad)}; valid: "
                            f"{', '.join(defaults)}.")
    return recipe


def load_preset(name: str | None = None, backbone: str | None = None) -> dict:
    """The plans recipe for ``--preset NAME [--backbone B]``, with ``backbone`` and ``plans_name`` filled in.

    A recipe takes any backbone (default: DinoUNet's, ViT-S/16); an alias names its own backbone, so another
    ``--backbone`` with it is refused rather than silently ignored."""
    from nnunet_dino.backbones import get_spec

    if name in ALIASES:
        own, recipe_name = ALIASES[name]
        if backbone and backbone != own:
            raise DinoUNetError(f"--preset {name} is {own} with the {recipe_name} recipe; for {backbone} pass "
                                f"--backbone {backbone} --preset {recipe_name}.")
        backbone, plans_name = own, f"nnUNetPlans_{name}"
    else:
        recipe_name = name or DEFAULT_RECIPE
        backbone = backbone or network_defaults()["backbone"]
        plans_name = f"nnUNetPlans_{backbone}" + ("" if recipe_name == DEFAULT_RECIPE else f"_{recipe_name}")
    get_spec(backbone)
    return load_recipe(recipe_name) | {"backbone": backbone, "plans_name": plans_name}


def preset_architecture(stock_arch: dict, preset: dict) -> dict:
    """The architecture block a preset writes: ops from the stock plans, network defaults, the backbone's default
    dtype, then the overrides."""
    from nnunet_dino.backbones import get_spec

    block = dino_architecture(stock_arch)
    kwargs = network_defaults()
    kwargs.pop("backbone_weights", None)           # found in nnUNet_dino_weights at train time, then recorded
    kwargs.pop("backbone_weights_sha256", None)
    kwargs.update(block["arch_kwargs"])
    kwargs["backbone"] = preset["backbone"]
    kwargs["backbone_dtype"] = get_spec(preset["backbone"]).default_dtype  # e.g. 7B's frozen weights in bf16
    kwargs.update(copy.deepcopy(preset.get("arch_kwargs", {})))
    kwargs["features_per_stage"] = list(kwargs["features_per_stage"])
    block["arch_kwargs"] = {k: v for k, v in kwargs.items() if v is not None or k in OP_KEYS or k.endswith("_kwargs")}
    return block


def make_plans(stock: dict, preset: dict, plans_name: str) -> tuple[dict, bool]:
    """Derive a Dino U-Net plans dict from stock ``nnUNetPlans``; returns (plans, needs_new_preprocessing)."""
    if "2d" not in stock.get("configurations", {}):
        raise DinoUNetError("The stock plans have no '2d' configuration; run nnUNetv2_plan_and_preprocess -c 2d first.")
    plans = copy.deepcopy(stock)
    plans["plans_name"] = plans_name
    cfg = plans["configurations"]["2d"]
    cfg["architecture"] = preset_architecture(cfg["architecture"], preset)
    needs_preprocessing = False
    target = preset.get("target_shape")
    if target:  # the reference's high-resolution recipe: the median image resampled to target_shape
        median_shape = cfg["median_image_size_in_voxels"][-2:]
        spacing = [s * m / t for s, m, t in zip(cfg["spacing"][-2:], median_shape, target, strict=True)]
        if any(abs(a - b) > 1e-6 * max(abs(b), 1e-12) for a, b in zip(spacing, cfg["spacing"][-2:], strict=True)):
            cfg["spacing"] = spacing
            cfg["median_image_size_in_voxels"] = [float(t) for t in target]
            cfg["data_identifier"] = f"{plans_name}_2d"
            needs_preprocessing = True
    cfg["patch_size"] = round_patch_size(preset.get("patch_size") or cfg["patch_size"])
    if preset.get("batch_size"):
        cfg["batch_size"] = int(preset["batch_size"])
    return plans, needs_preprocessing


# nnU-Net's own files in a preprocessed dataset folder: a plans name must never be one of them
RESERVED_NAMES = ("nnUNetPlans", "dataset", "dataset_fingerprint", "splits_final")
_PLANS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def check_plans_name(name: str) -> str:
    """A plans name is one file name in the preprocessed folder, and not one of nnU-Net's own files."""
    if not _PLANS_NAME.match(name) or name.endswith(".json"):
        raise DinoUNetError(f"--plans-name {name!r} must be a plain name (letters, digits, _ . + -; no path, no "
                            f".json), e.g. nnUNetPlans_dinounet_s.")
    if name in RESERVED_NAMES:
        raise DinoUNetError(f"--plans-name {name} would overwrite nnU-Net's {name}.json; choose another name (not "
                            f"{', '.join(RESERVED_NAMES)}).")
    return name


ENCODER_SCALE_AUTO = "auto"
# The token grid per patch side below which `plans` warns, and which --encoder-scale auto reaches. The reference
# plans every dataset at 512 x 512, i.e. 32 x 32 tokens; what the grid does on our data: docs/benchmarks.md.
MIN_TOKENS_PER_SIDE = 16
# The encoder study (docs/benchmarks.md) measured 16 x 16 tokens per 128-px patch (scale 2) against 8 x 8: both
# weights gained and the pretrained encoder went from below random weights to above them, so `plans` writes "auto"
# unless told otherwise; 4 was not measured, so auto stops at 2 (4 stays available by name; 1 is the reference).
DEFAULT_ENCODER_SCALE = "auto"
AUTO_ENCODER_SCALES = (1, 2)


def token_grid(patch_size: Sequence[int], encoder_scale: int = 1) -> list[int]:
    """Tokens per side the ViT sees for one (padded) patch: one per 16 px of the patch upsampled by encoder_scale."""
    from nnunet_dino.backbones import TOKEN_GRID

    return [p * int(encoder_scale) // TOKEN_GRID for p in round_patch_size(patch_size)]


def choose_encoder_scale(patch_size: Sequence[int], choice: str | int | None = None) -> int:
    """An explicit scale (1, 2, 4) is checked; 'auto' (the default) is the smallest of AUTO_ENCODER_SCALES that gives
    MIN_TOKENS_PER_SIDE tokens on the patch's shorter side, else the largest of them."""
    from nnunet_dino.network.dino_unet import ENCODER_SCALES

    choice = str(DEFAULT_ENCODER_SCALE if choice is None else choice)
    if choice == ENCODER_SCALE_AUTO:
        fits = [s for s in AUTO_ENCODER_SCALES if min(token_grid(patch_size, s)) >= MIN_TOKENS_PER_SIDE]
        return fits[0] if fits else AUTO_ENCODER_SCALES[-1]
    if choice not in {str(s) for s in ENCODER_SCALES}:
        raise DinoUNetError(f"--encoder-scale {choice} is unknown; valid choices: "
                            f"{', '.join(map(str, ENCODER_SCALES))}, {ENCODER_SCALE_AUTO}.")
    return int(choice)


def token_grid_note(plans: dict) -> str:
    """One line for `plans`: the token grid the 2d patch gives, with a warning below MIN_TOKENS_PER_SIDE."""
    cfg = plans["configurations"]["2d"]
    scale = int(cfg["architecture"]["arch_kwargs"].get("encoder_scale", 1))
    grid = token_grid(cfg["patch_size"], scale)
    patch = " x ".join(map(str, cfg["patch_size"]))
    line = f"token grid: {grid[0]} x {grid[1]} per {patch} patch (encoder_scale {scale})"
    if min(grid) < MIN_TOKENS_PER_SIDE:
        line += (f"; WARNING: below {MIN_TOKENS_PER_SIDE} tokens per side (the reference plans 32 x 32); "
                 f"--encoder-scale {ENCODER_SCALE_AUTO} feeds the encoder more (docs/benchmarks.md, encoder study)")
    return line


def write_plans(dataset: str | int, preset: str | None = None, plans_name: str | None = None,
                force: bool = False, backbone: str | None = None, encoder_scale: str | int | None = None,
                weights: str | None = None) -> tuple[Path, bool]:
    """Write ``<plans_name>.json`` next to the dataset's ``nnUNetPlans.json``; returns (path, needs_preprocessing).
    An existing plans file of that name is replaced only with ``force``. ``weights``: 'random' (architecture and
    cost only) or a file, recorded in the plans so every printed command runs without the weights folder."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise DinoUNetError("nnUNet_preprocessed is not set; export it as for any nnU-Net command.")
    spec = load_preset(preset if preset or backbone else "dinounet_s", backbone)
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise DinoUNetError(f"Dataset {dataset} is not in nnUNet_raw/nnUNet_preprocessed; run "
                            f"nnUNetv2_plan_and_preprocess -d {dataset} -c 2d first.") from None
    stock_file = Path(preprocessed) / name / "nnUNetPlans.json"
    if not stock_file.is_file():
        raise DinoUNetError(f"{stock_file} does not exist; run nnUNetv2_plan_and_preprocess -d {dataset} -c 2d first.")
    if weights is not None:
        weights = plans_weights(spec["backbone"], weights)
        spec["arch_kwargs"] = {**spec.get("arch_kwargs", {}), "backbone_weights": weights}
        if weights == "random" and not plans_name:
            spec["plans_name"] += "_random"
    plans_name = check_plans_name(plans_name or spec["plans_name"])
    target = stock_file.with_name(f"{plans_name}.json")
    plans, needs_preprocessing = make_plans(json.loads(stock_file.read_text()), spec, plans_name)
    cfg = plans["configurations"]["2d"]
    cfg["architecture"]["arch_kwargs"]["encoder_scale"] = choose_encoder_scale(cfg["patch_size"], encoder_scale)
    if target.exists() and not force and read_json_object(target) != plans:  # the same plans again: nothing is lost
        raise DinoUNetError(f"{target} exists with other content; add --force to replace it, or choose another "
                            f"--plans-name.")
    atomic_write_json(plans, target)
    return target, needs_preprocessing


def plans_weights(backbone: str, weights: str) -> str:
    """'random', or a weight file checked now (found, readable, the right variant) and recorded by absolute path."""
    from nnunet_dino.backbones import RANDOM, check_weight_file

    if weights == RANDOM:
        return RANDOM
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise DinoUNetError(f"--weights {weights}: no such file; pass a weight file for {backbone} or 'random'.")
    check_weight_file(backbone, path)
    return str(path)


def plans_next_steps(dataset: str, plans_name: str) -> list[tuple[str, str]]:
    """What to run with new plans: a one-minute check, the training, prediction, the comparison with stock nnU-Net
    on the same folds, and the export. Every line but predict (IN/OUT) runs as printed: this environment's
    programs by path (no activated venv needed), every argument quoted for the shell, -device where there is no CUDA.
    """
    import sys
    from shlex import quote

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunet_dino.nnunet.environment import default_device

    bin_dir = Path(sys.executable).parent
    train, predict, tool = (quote(str(bin_dir / n)) for n in ("nnUNetv2_train", "nnUNetv2_predict", "nnunet-dino"))
    name = maybe_convert_to_dataset_name(dataset)
    model = convert_trainer_plans_config_to_identifier("nnUNetTrainerDinoUNet", plans_name, "2d")
    device = default_device()
    nn_device = "" if device == "cuda" else f" -device {device}"  # nnU-Net assumes CUDA
    d, p = quote(str(dataset)), quote(plans_name)
    return [
        ("check", f"{train} {d} 2d 0 -tr nnUNetTrainerDinoUNet_check -p {p}{nn_device}"),
        ("train", f"{train} {d} 2d 0 -tr nnUNetTrainerDinoUNet -p {p}{nn_device}"),
        ("predict", f"{predict} -i IN -o OUT -d {d} -c 2d -tr nnUNetTrainerDinoUNet -p {p} -f 0{nn_device}"),
        ("compare", f"{tool} benchmark -d {d} --trainers nnUNetTrainer nnUNetTrainerDinoUNet -p nnUNetPlans {p} "
                    f"--folds 0 1 2 3 4 --train-missing --device {device} -o {quote('benchmark_' + plans_name)}"),
        ("export", f"{tool} export -m \"$nnUNet_results\"/{quote(name + '/' + model)} -f 0 "
                   f"-o {quote('exported_' + plans_name)}"),
    ]

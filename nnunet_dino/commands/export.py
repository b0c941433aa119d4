"""``nnunet-dino export``: a trained Dino U-Net (backbone included) as ONNX or TorchScript, plus preprocessing.json.

What nnU-Net does around the network -- cropping to the non-zero region, normalisation, resampling, sliding window
with Gaussian weighting, mirroring, fold averaging, argmax -- is described in ``preprocessing.json`` with the
numbers this model uses, so ``examples/onnx_predict.py`` (onnxruntime + numpy) reproduces ``nnUNetv2_predict``.
The exported graph is ``DinoUNet.segment``: inputs (N, C, H, W) float32 with H and W multiples of 32 (ONNX: any
such size; TorchScript is traced at one size, ``--size``). LoRA factors are merged into the weights first;
``--dtype`` is the frozen backbone's dtype (as ``backbone_dtype`` in training: the rest stays float32).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import NETWORK_MULTIPLE

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# nnUNetv2_predict's defaults (nnUNetPredictor): what the exported sliding window must do to match it
SLIDING_WINDOW = {"tile_step_size": 0.5, "use_gaussian": True, "gaussian_sigma_scale": 1.0 / 8,
                  "gaussian_value_scaling_factor": 10, "use_mirroring": True, "fold_averaging": "mean of logits"}


def onnx_example_command(exported: Path, image: str = "IMAGE_0000<ending>", out: str = "OUT") -> str:
    """How to segment with the export, runnable as printed: this environment's Python (onnxruntime is part of the
    install) and the example script of this checkout (it is not installed with the package)."""
    import shlex
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "onnx_predict.py"
    where = shlex.quote(str(script)) if script.is_file() else "examples/onnx_predict.py"
    return f"{shlex.quote(sys.executable)} {where} {shlex.quote(str(exported))} {image} -o {out}"


def sample_image(model: Path, exported: Path) -> tuple[str, str]:
    """(image, output folder) for the printed ONNX example: the model's first raw test (else training) image when
    nnUNet_raw holds its dataset, so the line runs as printed; placeholders otherwise."""
    import shlex

    from nnunetv2.paths import nnUNet_raw

    raw = Path(nnUNet_raw or "/nonexistent") / model.resolve().parent.name
    images = sorted((raw / "imagesTs").glob("*_0000.*")) or sorted((raw / "imagesTr").glob("*_0000.*"))
    if not images:
        return "IMAGE_0000<ending>", "OUT"
    return shlex.quote(str(images[0])), shlex.quote(str(exported.with_name(f"{exported.name}_predictions")))


def _configuration(model: Path) -> str:
    from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config

    parts = convert_identifier_to_trainer_plans_config(str(model))
    if len(parts) != 3:
        raise DinoUNetError(f"{model} is not an nnU-Net model folder (expected <trainer>__<plans>__<configuration>); "
                            f"pass <nnUNet_results>/<Dataset>/<trainer>__<plans>__2d.")
    return parts[2]


def trainer_class(name: str) -> type:
    """The trainer class of that name, found exactly as nnU-Net finds it (its own trainers, then the folders on
    nnUNet_extTrainer, ours included); any subclass of our trainers is accepted, any other trainer refused."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_dino.nnunet.environment import EXT_ENV, ext_trainer_value
    from nnunet_dino.nnunet.trainers import nnUNetTrainerDinoUNet

    previous = os.environ.get(EXT_ENV)
    os.environ[EXT_ENV] = ext_trainer_value()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search on stdout
            cls = recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        cls = None
    finally:
        if previous is None:
            os.environ.pop(EXT_ENV, None)
        else:
            os.environ[EXT_ENV] = previous
    if cls is None:
        raise DinoUNetError(f"This model was trained with {name}, which neither nnU-Net nor {EXT_ENV} provides; put "
                            f"the folder of that trainer's .py on {EXT_ENV} (export {EXT_ENV}=...:<folder>).")
    if not issubclass(cls, nnUNetTrainerDinoUNet):
        raise DinoUNetError(f"This model was trained with {name}, not a Dino U-Net trainer; nnunet-dino export "
                            f"handles models of nnUNetTrainerDinoUNet and its subclasses only.")
    return cls


def load_fold(model: Path, fold: int | str, checkpoint: str = "checkpoint_final.pth"):
    """(network in eval mode, plans manager, configuration manager, dataset.json, checkpoint) for one fold."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dino.nnunet.allowlist import check_plans_imports
    from nnunet_dino.nnunet.checkpoints import read_checkpoint

    if not (model / "plans.json").is_file() or not (model / "dataset.json").is_file():
        raise DinoUNetError(f"{model} is not an nnU-Net model folder (no plans.json/dataset.json); pass "
                            f"<nnUNet_results>/<Dataset>/<trainer>__<plans>__2d.")
    plans = json.loads((model / "plans.json").read_text())
    check_plans_imports(plans, model / "plans.json")  # before anything imports what the plans name
    ckpt_file = model / f"fold_{fold}" / checkpoint
    if not ckpt_file.is_file():
        present = sorted(p.parent.name[5:] for p in model.glob(f"fold_*/{checkpoint}"))
        raise DinoUNetError(f"{ckpt_file} does not exist; folds with {checkpoint}: {' '.join(present) or 'none'} "
                            f"(choose -f from those, or -chk checkpoint_best.pth / checkpoint_latest.pth).")
    plans_manager = PlansManager(plans)
    dataset_json = json.loads((model / "dataset.json").read_text())
    ckpt = read_checkpoint(ckpt_file)
    if not isinstance(ckpt.get("trainer_name"), str) or not isinstance(ckpt.get("network_weights"), dict):
        raise DinoUNetError(f"{ckpt_file} names no trainer_name or holds no network_weights: it is not a checkpoint "
                            f"nnUNetv2_train wrote; export a fold nnU-Net trained (or retrain this one).")
    cls = trainer_class(ckpt["trainer_name"])
    init_args = ckpt.get("init_args") if isinstance(ckpt.get("init_args"), dict) else {}
    cfg = plans_manager.get_configuration(init_args.get("configuration", _configuration(model)))
    network = cls.build_network_architecture(
        plans_manager, cfg, determine_num_input_channels(plans_manager, cfg, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    try:
        network.load_state_dict(ckpt["network_weights"])
    except RuntimeError as e:  # missing/unexpected keys, a wrong tensor shape
        detail = " ".join(str(e).split())[:160]
        raise DinoUNetError(f"{ckpt_file} does not fit the network {model / 'plans.json'} builds ({detail}); the "
                            f"checkpoint and the plans come from different models: export the folder as nnU-Net "
                            f"wrote it.") from None
    return network.eval(), plans_manager, cfg, dataset_json, ckpt


class Segmenter(nn.Module):
    """The exported graph: raw logits for an input already at a multiple of 32 (``DinoUNet.segment``)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.segment(x)


def preprocessing_description(plans_manager, cfg, dataset_json: dict, ckpt: dict, folds: Sequence,
                              files: Sequence[str], dtype: str, size: Sequence[int] | None) -> dict:
    """Everything nnUNetv2_predict does around the network, with this model's numbers."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    props = plans_manager.plans["foreground_intensity_properties_per_channel"]
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    return {
        "format_version": 1,
        "networks": list(files), "folds": [str(f) for f in folds], "input_dtype": "float32",
        "backbone_dtype": dtype,
        "input_layout": f"N, C, H, W; H and W multiples of {NETWORK_MULTIPLE}" + (
            f"; traced at {size[0]} x {size[1]} only" if size else ""),
        "file_ending": dataset_json["file_ending"], "image_reader_writer": plans_manager.plans["image_reader_writer"],
        "channel_names": channels,
        "normalization_schemes": list(cfg.normalization_schemes),
        "use_mask_for_norm": list(cfg.use_mask_for_norm),
        "intensity_properties_per_channel": [props[str(i)] for i in range(len(channels))],
        "crop_to_nonzero": True,
        "transpose_forward": list(plans_manager.transpose_forward),
        "transpose_backward": list(plans_manager.transpose_backward),
        "target_spacing": list(cfg.spacing),
        "resampling": {"data_order": cfg.configuration["resampling_fn_data_kwargs"].get("order", 3),
                       "probabilities_order": cfg.configuration["resampling_fn_probabilities_kwargs"].get("order", 1)},
        "patch_size": list(cfg.patch_size),
        "labels": dataset_json["labels"],
        "has_regions": label_manager.has_regions,
        "regions_class_order": list(label_manager.regions_class_order or []) if label_manager.has_regions else None,
        "num_segmentation_heads": label_manager.num_segmentation_heads,
        "sliding_window": SLIDING_WINDOW | {"mirror_axes": list(mirror) if mirror is not None else []},
    }


def _export_onnx(module: nn.Module, example: torch.Tensor, target: Path, dynamic: bool) -> None:
    dims = None
    if dynamic:
        from torch.export import Dim

        h, w = Dim("h32", min=1, max=512), Dim("w32", min=1, max=512)
        dims = {"x": {0: Dim("batch", min=1, max=256), 2: NETWORK_MULTIPLE * h, 3: NETWORK_MULTIPLE * w}}
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it; say so in one line rather than deep inside)
    except ImportError:
        raise DinoUNetError("ONNX export needs onnx and onnxscript (part of nnunet-dino's install): pip install "
                            "'onnx>=1.16' 'onnxscript>=0.2'.") from None
    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dims, input_names=["x"],
                                output_names=["logits"], opset_version=18, verbose=False)
    program.save(str(target))


def _export_torchscript(module: nn.Module, example: torch.Tensor, target: Path) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python: the size is fixed here
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(target))


def export_model(model: Path, folds: Sequence[int | str], out: Path, fmt: str = "onnx",
                 checkpoint: str = "checkpoint_final.pth", size: Sequence[int] | None = None,
                 dtype: str = "float32", force: bool = False) -> Path:
    """Export each fold's network and write preprocessing.json into ``out`` (written whole or not at all, under the
    output rule of ``nnunet_dino.files``)."""
    from nnunet_dino.files import OutputFolder, atomic_write_json

    if fmt not in FORMATS:
        raise DinoUNetError(f"--format {fmt} is unknown; valid choices: {', '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise DinoUNetError(f"--dtype {dtype} is unknown; valid choices: {', '.join(DTYPES)}.")
    if size is not None and (len(size) != 2 or any(s <= 0 or s % NETWORK_MULTIPLE for s in size)):
        raise DinoUNetError(f"--size {' '.join(map(str, size))} must be two positive multiples of {NETWORK_MULTIPLE} "
                            f"(e.g. --size 512 512).")
    if fmt == "torchscript" and size is None:
        raise DinoUNetError("TorchScript graphs are traced at one size; pass --size H W (multiples of 32), or use "
                            "--format onnx for any size.")
    if fmt == "onnx" and dtype == "bfloat16":
        raise DinoUNetError("onnxruntime has no bfloat16 kernels for this graph; export ONNX as float32 or float16.")
    folds = [str(f) for f in folds]
    if len(set(folds)) != len(folds):
        raise DinoUNetError(f"-f names a fold twice ({' '.join(folds)}); name each fold once.")
    _configuration(model)
    model = Path(model).absolute()
    target = OutputFolder(out, "export", force=force)
    if model == target.path or model.is_relative_to(target.path):
        raise DinoUNetError(f"-o {out} holds the model folder {model}; write the export somewhere else.")
    loaded = [load_fold(model, f, checkpoint) for f in folds]  # every fold checked before anything is written
    needed = sum(_state_bytes(network) for network, *_ in loaded) * 5 // 4 + 2**20

    def build(stage: Path) -> None:
        files = []
        for fold, (network, *_) in zip(folds, loaded, strict=True):
            files.append(_export_fold(network, fold, fmt, dtype, size, stage))
        _, plans_manager, cfg, dataset_json, ckpt = loaded[0]
        atomic_write_json(preprocessing_description(plans_manager, cfg, dataset_json, ckpt, folds, files, dtype,
                                                    size), stage / "preprocessing.json")

    target.write(build, needed_bytes=needed)
    return target.path


def _state_bytes(network: nn.Module) -> int:
    """What the exported graph holds: every parameter and buffer, the frozen backbone included."""
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers()))


def _export_fold(network: nn.Module, fold: str, fmt: str, dtype: str, size: Sequence[int] | None,
                 stage: Path) -> str:
    from nnunet_dino.backbones import cast_vit
    from nnunet_dino.backbones.lora import merge_lora

    merged = merge_lora(network)
    if merged:
        log.info("fold %s: merged %d LoRA layers into the backbone weights", fold, merged)
    if dtype != "float32":  # the frozen backbone in half precision, as backbone_dtype does in training
        cast_vit(network.backbone.vit, network.backbone.family, DTYPES[dtype])
    module = Segmenter(network).eval()
    example = torch.randn(2, network.input_channels, *(size or [2 * NETWORK_MULTIPLE, 3 * NETWORK_MULTIPLE]))
    name = f"fold_{fold}.{'onnx' if fmt == 'onnx' else 'pt'}"
    print(f"exporting fold {fold} ({fmt}, {dtype}) ...", flush=True)
    if fmt == "onnx":
        _export_onnx(module, example, stage / name, dynamic=size is None)
    else:
        _export_torchscript(module, example, stage / name)
    return name

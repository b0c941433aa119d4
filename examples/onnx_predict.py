"""Segment images with an exported Dino U-Net using onnxruntime and numpy only -- what nnUNetv2_predict does.

    nnunet-dino export -m MODEL_FOLDER -f 0 --format onnx -o exported/
    python examples/onnx_predict.py exported/ image_0000.png [image2_0000.png ...] -o predictions/

Steps (numbers from exported/preprocessing.json): transpose, crop to the non-zero region, normalise, resample to the
target spacing, sliding window with Gaussian weighting and mirroring, average the folds' logits, resample back,
softmax/argmax (or region thresholds), un-crop, transpose back. Accumulation is in float16, as nnUNetv2_predict does.
Resampling here is linear (nnU-Net uses cubic for images); when no resampling is needed (e.g. 2-D PNGs) the
result matches nnUNetv2_predict (tests/test_export.py checks it).

Reading and writing files uses Pillow for PNG and nibabel for NIfTI (the computation itself is numpy only); for
multi-channel cases pass the _0000 file, the other channels are found next to it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np


# --- preprocessing -------------------------------------------------------------------------------------------------
def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not connected to the border becomes foreground (scipy's binary_fill_holes), by flood fill."""
    outside = np.zeros(mask.shape, bool)
    border = [slice(None)] * mask.ndim
    for axis in range(mask.ndim):
        for end in (0, -1):
            border[axis] = end
            outside[tuple(border)] = ~mask[tuple(border)]
            border[axis] = slice(None)
    while True:
        grown = outside.copy()
        for axis in range(mask.ndim):
            for shift in (1, -1):
                rolled = np.roll(outside, shift, axis)
                edge = [slice(None)] * mask.ndim
                edge[axis] = 0 if shift == 1 else -1
                rolled[tuple(edge)] = False
                grown |= rolled
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def crop_to_nonzero(data: np.ndarray):
    mask = fill_holes((data != 0).any(axis=0))
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    bbox = [(int(i[0]), int(i[-1]) + 1) if i.size else (0, n) for i, n in zip(idx, mask.shape)]
    slicer = tuple(slice(a, b) for a, b in bbox)
    return data[(slice(None), *slicer)], mask[slicer], bbox


def normalise(data: np.ndarray, mask: np.ndarray, cfg: dict) -> np.ndarray:
    out = data.astype(np.float32)
    for c, scheme in enumerate(cfg["normalization_schemes"]):
        x, props = out[c], cfg["intensity_properties_per_channel"][c]
        if scheme == "ZScoreNormalization":
            if cfg["use_mask_for_norm"][c]:
                x[mask] = (x[mask] - x[mask].mean()) / max(x[mask].std(), 1e-8)
                x[~mask] = 0
            else:
                x[:] = (x - x.mean()) / max(x.std(), 1e-8)
        elif scheme == "CTNormalization":
            clipped = np.clip(x, props["percentile_00_5"], props["percentile_99_5"])
            x[:] = (clipped - props["mean"]) / max(props["std"], 1e-8)
        elif scheme == "RescaleTo01Normalization":
            x -= x.min()
            x /= max(x.max(), 1e-8)
        elif scheme == "RGBTo0_1Normalization":
            x /= 255.0
        elif scheme != "NoNormalization":
            raise ValueError(f"normalisation {scheme} is not implemented in this example")
    return out


def resize_linear(data: np.ndarray, shape) -> np.ndarray:
    """(C, *spatial) to (C, *shape), separable linear interpolation on pixel centres."""
    for axis, n in enumerate(shape, start=1):
        old = data.shape[axis]
        if old == n:
            continue
        pos = np.clip((np.arange(n) + 0.5) * old / n - 0.5, 0, old - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, old - 1)
        w = (pos - lo).reshape([-1 if i == axis else 1 for i in range(data.ndim)])
        data = np.take(data, lo, axis) * (1 - w) + np.take(data, hi, axis) * w
    return data


# --- sliding window ------------------------------------------------------------------------------------------------
def gaussian_1d(n: int, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter of a centred delta along one axis (truncate 4, zero outside the window)."""
    radius = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.zeros(n)
    c = n // 2
    for i in range(n):
        if abs(i - c) <= radius:
            out[i] = k[i - c + radius]
    return out


def gaussian_map(patch, sigma_scale: float, value_scaling: float) -> np.ndarray:
    g = np.ones(())
    for n in patch:
        g = np.multiply.outer(g, gaussian_1d(n, n * sigma_scale))
    g = (g / (g.max() / value_scaling)).astype(np.float16)
    g[g == 0] = g[g != 0].min()
    return g


def steps(size: int, tile: int, step: float) -> list[int]:
    n = int(math.ceil((size - tile) / (tile * step))) + 1
    return [int(np.round((size - tile) / (n - 1) * i)) if n > 1 else 0 for i in range(n)]


def predict_logits(sessions, data: np.ndarray, cfg: dict) -> np.ndarray:
    """(C, Z, Y, X) preprocessed -> (K, Z, Y, X) logits: 2-D patches per slice, Gaussian-weighted, mirrored."""
    patch, sw = cfg["patch_size"], cfg["sliding_window"]
    spatial = data.shape[-2:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    data = np.pad(data, [(0, 0), (0, 0)] + [(d // 2, d // 2 + d % 2) for d in pad])
    gauss = gaussian_map(patch, sw["gaussian_sigma_scale"], sw["gaussian_value_scaling_factor"]) \
        if sw["use_gaussian"] else np.ones(patch, np.float16)
    axes = [a + 2 for a in sw["mirror_axes"]] if sw["use_mirroring"] else []
    flips = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    total = None
    for session in sessions:
        name = session.get_inputs()[0].name
        logits = np.zeros((cfg["num_segmentation_heads"], *data.shape[1:]), np.float16)
        weight = np.zeros(data.shape[1:], np.float16)
        for z in range(data.shape[1]):
            for y in steps(data.shape[2], patch[0], sw["tile_step_size"]):
                for x in steps(data.shape[3], patch[1], sw["tile_step_size"]):
                    tile = np.ascontiguousarray(data[None, :, z, y:y + patch[0], x:x + patch[1]], np.float32)
                    pred = session.run(None, {name: tile})[0]
                    for f in flips:
                        pred += np.flip(session.run(None, {name: np.ascontiguousarray(np.flip(tile, f))})[0], f)
                    pred = (pred[0] / (len(flips) + 1)).astype(np.float16) * gauss
                    logits[:, z, y:y + patch[0], x:x + patch[1]] += pred
                    weight[z, y:y + patch[0], x:x + patch[1]] += gauss
        logits = (logits / weight).astype(np.float32)
        total = logits if total is None else total + logits
    total /= len(sessions)
    crop = [slice(d // 2, total.shape[i + 2] - (d // 2 + d % 2)) for i, d in enumerate(pad)]
    return total[(slice(None), slice(None), *crop)]


# --- the whole case ------------------------------------------------------------------------------------------------
def segment(sessions, image: np.ndarray, spacing, cfg: dict, return_probabilities: bool = False):
    """image (C, Z, Y, X) in the reader's axis order with its spacing -> label map (Z, Y, X) [+ probabilities]."""
    tf, tb = cfg["transpose_forward"], cfg["transpose_backward"]
    data = image.astype(np.float32).transpose([0, *[i + 1 for i in tf]])
    spacing = [spacing[i] for i in tf]
    shape_before_crop = data.shape[1:]
    data, mask, bbox = crop_to_nonzero(data)
    cropped_shape = data.shape[1:]
    target = list(cfg["target_spacing"])
    if len(target) < len(cropped_shape):
        target = [spacing[0]] + target
    new_shape = [int(round(s / t * n)) for s, t, n in zip(spacing, target, cropped_shape)]
    data = resize_linear(normalise(data, mask, cfg), new_shape)
    logits = resize_linear(predict_logits(sessions, data, cfg), cropped_shape)
    if cfg["has_regions"]:
        probs = 1 / (1 + np.exp(-logits))
        seg = np.zeros(cropped_shape, np.uint8)
        for i, c in enumerate(cfg["regions_class_order"]):
            seg[probs[i] > 0.5] = c
    else:
        e = np.exp(logits - logits.max(0, keepdims=True))
        probs = e / e.sum(0, keepdims=True)
        seg = probs.argmax(0).astype(np.uint8)
    full = np.zeros(shape_before_crop, np.uint8)
    full[tuple(slice(a, b) for a, b in bbox)] = seg
    full = full.transpose(tb)
    if return_probabilities:
        probs_full = np.zeros((probs.shape[0], *shape_before_crop), np.float32)
        probs_full[(slice(None), *[slice(a, b) for a, b in bbox])] = probs
        if not cfg["has_regions"]:  # outside the crop nnU-Net reports certain background
            inside = np.zeros(shape_before_crop, bool)
            inside[tuple(slice(a, b) for a, b in bbox)] = True
            probs_full[0][~inside] = 1
        return full, probs_full.transpose([0, *[i + 1 for i in tb]])
    return full


def load(folder: Path):
    import onnxruntime as ort

    cfg = json.loads((folder / "preprocessing.json").read_text())
    sessions = [ort.InferenceSession(str(inside(folder, f)), providers=["CPUExecutionProvider"])
                for f in cfg["networks"]]
    return sessions, cfg


def inside(folder: Path, name: str) -> Path:
    """A file that preprocessing.json names, refused unless it lies in the export folder itself."""
    path = (folder / name).resolve()
    if Path(name).name != name or path.parent != folder.resolve() or not path.is_file():
        raise SystemExit(f"onnx_predict.py: error: preprocessing.json names {name!r}, which is not a file in "
                         f"{folder}; use the folder nnunet-dino export wrote, unchanged.")
    return path


# --- file input/output (Pillow for PNG, nibabel for NIfTI) ---------------------------------------------------------
MAX_PIXELS = 8192 * 8192  # a larger image is refused from its header, before decoding


def _open_png(path: Path):
    """A PNG as an array; one line (not a traceback) for what is no readable image of a sane size."""
    from PIL import Image, UnidentifiedImageError

    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own size check, from the header
    try:
        with Image.open(path) as im:
            Image.MAX_IMAGE_PIXELS = bomb_limit
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise SystemExit(f"onnx_predict.py: error: {path} is {im.size[0]} x {im.size[1]} pixels, more than "
                                 f"this example reads ({MAX_PIXELS} pixels); crop or downsample it first.")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise SystemExit(f"onnx_predict.py: error: {path} is not a readable image ({type(e).__name__}); pass a "
                         f"PNG or NIfTI file.") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def _check_readable(path: Path) -> None:
    """A regular, non-empty file (not a folder, a link loop, a FIFO or a device, which could hang a reader)."""
    try:
        st = path.stat()
    except OSError as e:  # missing, or a symlink loop (ELOOP)
        raise SystemExit(f"onnx_predict.py: error: {path} cannot be read ({e.strerror}); pass an image file.") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise SystemExit(f"onnx_predict.py: error: {path} is not a regular file (a folder, FIFO or device); pass an "
                         f"image file.")
    if st.st_size == 0:
        raise SystemExit(f"onnx_predict.py: error: {path} is empty (0 bytes); pass an image file.")


def read_case(first: Path, n_channels: int):
    _check_readable(first)
    if "_0000" not in first.name:
        raise SystemExit(f"onnx_predict.py: error: {first} is not a <case>_0000<ending> file; pass the first "
                         f"channel's file (the model expects {n_channels} channel(s): _0000 .. _{n_channels - 1:04d}).")
    files = [first.with_name(first.name.replace("_0000", f"_{c:04d}")) for c in range(n_channels)]
    if first.suffix == ".png":
        arrays = [_open_png(first)]
        if arrays[0].ndim == 3:  # one RGB file holds three channels
            arrays = list(np.moveaxis(arrays[0][..., :3], -1, 0))
        else:
            _check_files(files, first, n_channels)
            for f in files[1:]:
                _check_readable(f)
            arrays += [_open_png(f) for f in files[1:]]
        if len(arrays) != n_channels:
            raise SystemExit(f"onnx_predict.py: error: {first.name} holds {len(arrays)} channels but the model "
                             f"expects {n_channels}; pass an image with {n_channels} channel(s).")
        return np.stack(arrays)[:, None], [999.0, 1.0, 1.0]
    import nibabel as nib

    _check_files(files, first, n_channels)
    images = [nib.load(str(f)) for f in files]
    if any(len(i.shape) != 3 for i in images):
        raise SystemExit(f"onnx_predict.py: error: {first.name} is not a 3-D volume with one channel per file; the "
                         f"model expects {n_channels} file(s) _0000 .. _{n_channels - 1:04d}, each 3-D.")
    # nnU-Net's NibabelIO order: (z, y, x) = the file's axes reversed
    return np.stack([np.asarray(i.dataobj).transpose(2, 1, 0) for i in images]), \
        [float(s) for s in images[0].header.get_zooms()[:3][::-1]]


def _check_files(files: list, first: Path, n_channels: int) -> None:
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"onnx_predict.py: error: the model expects {n_channels} channel(s) per case but "
                         f"{missing[0]} does not exist next to {first.name}.")


def write_case(seg: np.ndarray, target: Path, like: Path) -> None:
    if target.suffix == ".png":
        from PIL import Image

        Image.fromarray(seg[0]).save(target)
        return
    import nibabel as nib

    ref = nib.load(str(like))
    nib.save(nib.Nifti1Image(seg.transpose(2, 1, 0).astype(np.uint8), ref.affine), str(target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exported", type=Path, help="folder written by nnunet-dino export --format onnx")
    parser.add_argument("images", type=Path, nargs="+", help="<case>_0000<ending> files")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    sessions, cfg = load(args.exported)
    args.output.mkdir(parents=True, exist_ok=True)
    for first in args.images:
        image, spacing = read_case(first, len(cfg["channel_names"]))
        seg = segment(sessions, image, spacing, cfg)
        target = args.output / first.name.replace("_0000", "")
        write_case(seg, target, first)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()

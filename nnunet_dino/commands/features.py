"""``nnunet-dino features``: what the frozen encoder sees in an image, before any training.

Two views of one tapped layer's patch features: a PCA (three components as RGB, fitted on the foreground tokens)
and the cosine similarity of every token to the token under a chosen pixel. Good pretrained features group
anatomy by meaning; random weights give texture-like noise. Reads PNG/TIFF/JPEG and anything nnU-Net's NIfTI
readers read (a chosen axial slice).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_dino.backbones import TOKEN_GRID
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.files import atomic_write

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureViews:
    image: np.ndarray        # (H, W) in [0, 1]
    pca_rgb: np.ndarray      # (h, w, 3) in [0, 1], background black
    similarity: np.ndarray   # (h, w) cosine similarity to the chosen token, in [-1, 1]
    point: tuple[int, int]   # (y, x) in image pixels
    layer: int               # the tapped block


MAX_PIXELS = 8192 * 8192  # an image larger than this is refused from its header (a 20000 x 20000 PNG is 1.6 GB)


def read_image(path: Path, slice_index: int | None = None) -> np.ndarray:
    """A 2-D float image in [0, 1]: PNG/TIFF/JPEG (grey or RGB, averaged) or a NIfTI slice (axial, middle)."""
    name = path.name.lower()
    if not path.is_file():
        raise DinoUNetError(f"{path} does not exist; give an image file (PNG, TIFF, JPEG or NIfTI).")
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - nibabel raises several types for a damaged file
            raise DinoUNetError(f"{path} is not a readable NIfTI file ({type(e).__name__}); use another copy."
                                ) from None
        volume = volume[..., 0] if volume.ndim == 4 else volume
        volume = volume[:, :, None] if volume.ndim == 2 else volume  # a 2-D NIfTI is one slice
        if volume.ndim != 3:
            raise DinoUNetError(f"{path} has {volume.ndim} dimensions; give a 2-D, 3-D or 4-D NIfTI image.")
        z = volume.shape[2] // 2 if slice_index is None else slice_index
        if not 0 <= z < volume.shape[2]:
            raise DinoUNetError(f"--slice {z} is outside the volume's {volume.shape[2]} slices; choose "
                                f"0..{volume.shape[2] - 1}.")
        image = np.flipud(volume[:, :, z].T)
    else:
        from PIL import Image

        bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own size check below, one line
        try:
            with Image.open(path) as im:  # reads the header only: refuse a huge image before decoding it
                Image.MAX_IMAGE_PIXELS = bomb_limit
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise DinoUNetError(f"{path} is {im.size[0]} x {im.size[1]} pixels, more than this command reads "
                                        f"({MAX_PIXELS:,} pixels); crop or downsample it first.")
                image = np.asarray(im, dtype=np.float32)
        except (OSError, Image.DecompressionBombError) as e:
            raise DinoUNetError(f"{path} is not an image this command reads ({e}); use PNG, TIFF, JPEG or NIfTI."
                                ) from None
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit
        image = image[..., :3].mean(-1) if image.ndim == 3 else image
    if not np.isfinite(image).all():
        raise DinoUNetError(f"{path} holds NaN or infinite values; replace them (e.g. with 0) before looking at its "
                            f"features.")
    lo, hi = np.percentile(image, 0.5), np.percentile(image, 99.5)
    return np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1).astype(np.float32)


def feature_views(image: np.ndarray, backbone, layer: int | None = None,
                  point: tuple[int, int] | None = None, long_side: int | None = None) -> FeatureViews:
    """PCA and cosine-similarity views of one tapped layer (default: the last) for a 2-D image in [0, 1].

    ``long_side`` resizes the image first (bilinear) so small images get a finer token grid; ``point`` is given in
    the original image's pixels."""
    if long_side and max(image.shape) != long_side:
        scale = long_side / max(image.shape)
        size = (max(TOKEN_GRID, round(image.shape[0] * scale)), max(TOKEN_GRID, round(image.shape[1] * scale)))
        if point is not None:
            point = (min(size[0] - 1, int(point[0] * scale)), min(size[1] - 1, int(point[1] * scale)))
        image = F.interpolate(torch.from_numpy(image)[None, None], size=size, mode="bilinear",
                              align_corners=False)[0, 0].numpy()
    taps = list(backbone.tap_layers)
    layer = taps[-1] if layer is None else layer
    if layer not in taps:
        raise DinoUNetError(f"--layer {layer} is not tapped by {backbone.name}; valid choices: {taps}.")
    h, w = image.shape
    point = (h // 2, w // 2) if point is None else point
    if not (0 <= point[0] < h and 0 <= point[1] < w):
        raise DinoUNetError(f"--point {point[0]} {point[1]} is outside the {h}x{w} image.")
    x = torch.from_numpy(image)[None, None].repeat(1, 3, 1, 1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    x = F.pad(x, (0, (-w) % TOKEN_GRID, 0, (-h) % TOKEN_GRID), mode="replicate")
    with torch.no_grad():
        feats = backbone(x)[taps.index(layer)][0]                        # (D, rows, cols) on the token grid
    rows, cols = -(-h // TOKEN_GRID), -(-w // TOKEN_GRID)
    tokens = feats[:, :rows, :cols].flatten(1).T.double()                # (N, D)
    small = F.interpolate(torch.from_numpy(image)[None, None], size=(rows, cols), mode="area")[0, 0]
    foreground = (small > 0.05).flatten()
    if foreground.sum() < 4:
        foreground = torch.ones_like(foreground)
    fg = tokens[foreground]
    mean = fg.mean(0)
    _, _, v = torch.linalg.svd(fg - mean, full_matrices=False)
    proj = (tokens - mean) @ v[:3].T
    lo, hi = proj[foreground].quantile(0.01, dim=0), proj[foreground].quantile(0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    rgb[~foreground] = 0
    unit = F.normalize(tokens, dim=1)
    chosen = unit[(point[0] // TOKEN_GRID) * cols + point[1] // TOKEN_GRID]
    similarity = (unit @ chosen).reshape(rows, cols)
    return FeatureViews(image, rgb.reshape(rows, cols, 3).float().numpy(), similarity.float().numpy(), point, layer)


SIGNATURE = "nnunet-dino features"  # PNG text chunk: a file with it is this command's own output, safe to replace


def features_target(image: Path, output: Path, force: bool = False) -> Path:
    """The PNG to write under the output rule: an existing folder gets <image>_features.png; an existing file is
    replaced only if this command wrote it (or with --force); the input image never."""
    if output.is_dir():
        stem = image.name[:-7] if image.name.lower().endswith(".nii.gz") else image.stem
        output = output / f"{stem}_features.png"
    elif output.suffix.lower() != ".png":
        raise DinoUNetError(f"-o {output} must be a .png file or an existing folder.")
    if output.exists() and image.exists() and output.resolve() == image.resolve():
        raise DinoUNetError(f"-o {output} is the input image; write the picture to another file.")
    if output.exists() and not force and not _is_our_png(output):
        raise DinoUNetError(f"{output} exists and was not written by nnunet-dino features; choose another -o or add "
                            f"--force to replace it.")
    return output


def _is_our_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get("Software") == SIGNATURE
    except OSError:
        return False


def save_views(views: FeatureViews, target: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = views.image.shape
    extent = (0, views.pca_rgb.shape[1] * TOKEN_GRID, views.pca_rgb.shape[0] * TOKEN_GRID, 0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    axes[0].imshow(views.image, cmap="gray")
    axes[0].set_title("image")
    axes[1].imshow(views.pca_rgb, extent=extent, interpolation="nearest")
    axes[1].set_title(f"PCA of block {views.layer} features (RGB = PC 1-3)")
    sim = axes[2].imshow(views.similarity, extent=extent, cmap="magma", vmin=-1, vmax=1, interpolation="nearest")
    axes[2].set_title("cosine similarity to the token under +")
    fig.colorbar(sim, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.plot(views.point[1], views.point[0], "c+", markersize=12, markeredgewidth=2)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=90, format="png", metadata={"Software": SIGNATURE}))
    plt.close(fig)
    return target

"""Per-case, per-class segmentation metrics in physical units, for ``nnunet-dino benchmark``.

The metric pair Metrics Reloaded recommends for semantic segmentation (Dice and normalised surface distance at a
tolerance) plus HD95, mean symmetric surface distance, volumes and the confusion counts. Surface distances come
from MONAI (``monai.metrics.utils.get_edge_surface_distance``): maintained, takes per-axis spacing in 2D and 3D,
and its results are cross-checked against medpy in the tests (docs/benchmarks.md says why MONAI was chosen).
Surface distances are computed once per class and every distance metric is derived from them, with MONAI's own
definitions (NSD over boundary voxels; HD95 = the larger of the two directed 95th percentiles, as in DeepMind's
surface-distance and Metrics Reloaded -- medpy's ``hd95`` pools both directions instead and reads lower; MASD = the
mean of all boundary distances in both directions).

Empty masks (a class absent from the reference and/or the prediction) follow one documented convention so that
every case stays in the paired statistics and is counted in the report:

* both empty: a correct "absent" call -> Dice 1, NSD 1, HD95 0, MASD 0;
* exactly one empty: a missed or invented structure -> Dice 0, NSD 0, HD95 and MASD = the image's physical
  diagonal (the largest distance the image can hold), relative volume difference undefined (NaN) when the
  reference is empty.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

METRICS = ("dice", "nsd", "hd95_mm", "masd_mm")
HIGHER_IS_BETTER = {"dice": True, "nsd": True, "hd95_mm": False, "masd_mm": False}


def class_masks(seg: np.ndarray, labels: Mapping[str, int | Sequence[int]]) -> dict[str, np.ndarray]:
    """One boolean mask per class name; a region (a list of labels, nnU-Net's region-based training) is their union."""
    out = {}
    for name, value in labels.items():
        values = [value] if isinstance(value, (int, np.integer)) else list(value)
        out[name] = np.isin(seg, values)
    return out


def squeeze_singletons(array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Drop axes of size 1 with their spacing: a 2D image read as (1, H, W) must be measured in 2D, or every
    foreground pixel would count as boundary (the erosion would see empty slices above and below)."""
    if array.ndim != len(spacing):
        raise ValueError(f"array has {array.ndim} axes but spacing {tuple(spacing)} has {len(spacing)}")
    keep = [i for i, n in enumerate(array.shape) if n > 1] or [array.ndim - 1]
    return array.reshape([array.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def _surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]):
    """Boundary-to-boundary distances (prediction -> reference, reference -> prediction) in spacing units."""
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument it passes to itself (always_return_as_numpy); nothing for users to fix
        warnings.simplefilter("ignore", FutureWarning)
        _, (d_pred_ref, d_ref_pred), _ = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(ref), distance_metric="euclidean", spacing=spacing,
            symmetric=True, warn_empty=False)
    return d_pred_ref.double().numpy(), d_ref_pred.double().numpy()


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict:
    """All metrics for one class of one case; ``pred`` and ``ref`` are boolean masks of the same shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    pred, spacing_ = squeeze_singletons(np.asarray(pred, bool), spacing)
    ref, _ = squeeze_singletons(np.asarray(ref, bool), spacing)
    voxel = float(np.prod(spacing_))
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred & ~ref))
    fn = int(np.count_nonzero(~pred & ref))
    tn = int(pred.size - tp - fp - fn)
    n_pred, n_ref = tp + fp, tp + fn
    out = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "ref_empty": n_ref == 0, "pred_empty": n_pred == 0,
           "tolerance_mm": float(tolerance_mm),
           "vol_ref_mm3": n_ref * voxel, "vol_pred_mm3": n_pred * voxel,
           "abs_vol_diff_mm3": abs(n_pred - n_ref) * voxel,
           "rel_vol_diff": (n_pred - n_ref) / n_ref if n_ref else math.nan}
    if n_ref == 0 and n_pred == 0:
        return out | {"dice": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "masd_mm": 0.0}
    if n_ref == 0 or n_pred == 0:
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing_, strict=True))))
        return out | {"dice": 0.0, "nsd": 0.0, "hd95_mm": diagonal, "masd_mm": diagonal}
    d_pred_ref, d_ref_pred = _surface_distances(pred, ref, spacing_)
    both = np.concatenate([d_pred_ref, d_ref_pred])
    return out | {
        "dice": 2 * tp / (n_pred + n_ref),
        "nsd": float(np.count_nonzero(both <= tolerance_mm) / both.size),
        "hd95_mm": float(max(np.percentile(d_pred_ref, 95), np.percentile(d_ref_pred, 95))),
        "masd_mm": float(both.mean()),
    }


def case_metrics(pred_seg: np.ndarray, ref_seg: np.ndarray, spacing: Sequence[float],
                 labels: Mapping[str, int | Sequence[int]], tolerance_mm: Mapping[str, float]) -> list[dict]:
    """One row per class (``class`` = the dataset.json name) for one case's label maps."""
    if pred_seg.shape != ref_seg.shape:
        raise ValueError(f"prediction shape {pred_seg.shape} differs from reference shape {ref_seg.shape}")
    preds, refs = class_masks(pred_seg, labels), class_masks(ref_seg, labels)
    return [{"class": name, **binary_metrics(preds[name], refs[name], spacing, tolerance_mm[name])} for name in labels]

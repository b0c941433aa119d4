"""Dino U-Net vs nnU-Net on the same folds: Dice and HD95 per class and fold, mean ± sd, paired differences.

    python benchmarks/compare_nnunet.py -d 987 --trainers nnUNetTrainer nnUNetTrainerDinoUNet --folds 0 1 2 3 4

Runs stock ``nnUNetv2_train DATASET 2d FOLD -tr TRAINER --npz`` for every (trainer, fold) whose validation is
missing (nnU-Net's seeded splits_final.json makes the folds identical across trainers), then scores the stock
validation outputs against nnU-Net's ``gt_segmentations``. The first trainer is the baseline for the paired
differences. Writes the table to ``--out`` (markdown) as well as printing it. Needs nnUNet_* paths and
nnUNet_extTrainer (``eval "$(nnunet-dino env)"``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage


def hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """95th percentile symmetric surface distance (NaN if either mask is empty), in the image's spacing units."""
    if not pred.any() or not gt.any():
        return float("nan")
    surf_p = pred ^ ndimage.binary_erosion(pred)
    surf_g = gt ^ ndimage.binary_erosion(gt)
    d_to_g = ndimage.distance_transform_edt(~surf_g, sampling=spacing)[surf_p]
    d_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)[surf_g]
    return float(np.percentile(np.concatenate([d_to_g, d_to_p]), 95))


def score_fold(val_dir: Path, gt_dir: Path, reader, labels: dict) -> dict[str, dict[str, float]]:
    """Mean Dice and HD95 per class over the fold's validation cases."""
    ending = next(iter(sorted(gt_dir.iterdir()))).suffix
    out = {name: {"dice": [], "hd95": []} for name in labels}
    for pred_file in sorted(val_dir.glob(f"*{ending}")):
        pred, _ = reader.read_seg(str(pred_file))
        gt, props = reader.read_seg(str(gt_dir / pred_file.name))
        pred, gt = pred[0].squeeze(), gt[0].squeeze()
        spacing = np.asarray(props["spacing"], dtype=float)[-pred.ndim:]
        for name, c in labels.items():
            p, g = pred == c, gt == c
            total = p.sum() + g.sum()
            out[name]["dice"].append(2 * (p & g).sum() / total if total else 1.0)
            out[name]["hd95"].append(hd95(p, g, spacing))
    return {n: {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in d.items()}
            for n, d in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerDinoUNet"])
    parser.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"])
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="comparison.md")
    parser.add_argument("--no-train", action="store_true", help="only score existing validation outputs")
    args = parser.parse_args()

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(args.dataset)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    results = Path(os.environ["nnUNet_results"]) / name
    plans = PlansManager(str(pre / f"{args.plans}.json"))
    reader = plans.image_reader_writer_class()
    labels = {k: v for k, v in json.loads((pre / "dataset.json").read_text())["labels"].items()
              if k != "background" and isinstance(v, int)}
    bin_dir = Path(sys.executable).parent
    scores: dict[str, dict[str, dict]] = {}
    for trainer in args.trainers:
        for fold in args.folds:
            val = results / f"{trainer}__{args.plans}__2d" / f"fold_{fold}" / "validation"
            if not (val / "summary.json").is_file() and not args.no_train:
                cmd = [str(bin_dir / "nnUNetv2_train"), args.dataset, "2d", fold, "-tr", trainer, "-p", args.plans,
                       "-device", args.device, "--npz"]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            scores.setdefault(trainer, {})[fold] = score_fold(val, pre / "gt_segmentations", reader, labels)

    lines = [f"# {name}: {', '.join(args.trainers)} on folds {', '.join(args.folds)}", "",
             "| trainer | class | Dice mean ± sd | HD95 mean ± sd | per-fold Dice | paired ΔDice vs baseline | paired ΔHD95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = args.trainers[0]
    for trainer in args.trainers:
        for cls in labels:
            d = np.array([scores[trainer][f][cls]["dice"] for f in args.folds])
            h = np.array([scores[trainer][f][cls]["hd95"] for f in args.folds])
            db = np.array([scores[base][f][cls]["dice"] for f in args.folds])
            hb = np.array([scores[base][f][cls]["hd95"] for f in args.folds])
            diff = "—" if trainer == base else f"{np.mean(d - db):+.4f} ± {np.std(d - db):.4f}"
            hdiff = "—" if trainer == base else f"{np.nanmean(h - hb):+.2f} ± {np.nanstd(h - hb):.2f}"
            lines.append(f"| {trainer} | {cls} | {d.mean():.4f} ± {d.std():.4f} | {np.nanmean(h):.2f} ± {np.nanstd(h):.2f} "
                         f"| {' / '.join(f'{v:.3f}' for v in d)} | {diff} | {hdiff} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()

"""nnunet-dino benchmark: metrics with known answers, the statistics, and the command on a hand-made results tree."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.evaluation.metrics import binary_metrics, case_metrics
from nnunet_dino.evaluation.stats import compare_to_baseline, holm, mean_ranks, wilcoxon_p


# --- metrics -----------------------------------------------------------------------------------------------------
def shifted_rectangles(h=40, w=40, k=4, shape=(80, 80)):
    ref = np.zeros(shape, bool)
    ref[20:20 + h, 10:10 + w] = True
    return np.roll(ref, k, axis=1), ref


def test_shift_gives_the_geometrys_hd95_and_nsd():
    """A rectangle shifted by k voxels along x (spacing sx) against itself: the distances the geometry gives."""
    h = w = 40
    k, sx, sy = 4, 0.5, 3.0          # sy > k*sx: every side voxel's nearest boundary is its own row's
    pred, ref = shifted_rectangles(h, w, k)
    m = binary_metrics(pred, ref, (sy, sx), tolerance_mm=k * sx)
    assert m["hd95_mm"] == pytest.approx(k * sx)
    assert m["nsd"] == pytest.approx(1.0)
    assert m["dice"] == pytest.approx((w - k) / w)
    # below the smallest non-zero distance (sx) only the overlapping top/bottom voxels count
    boundary = 2 * w + 2 * (h - 2)
    assert binary_metrics(pred, ref, (sy, sx), tolerance_mm=0.25)["nsd"] == pytest.approx(2 * (w - k) / boundary)
    assert m["vol_ref_mm3"] == pytest.approx(h * w * sx * sy)
    assert m["abs_vol_diff_mm3"] == 0 and m["rel_vol_diff"] == 0
    assert (m["tp"], m["fp"], m["fn"]) == (h * (w - k), h * k, h * k)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anisotropic_3d_shift_along_each_axis(axis):
    spacing = [4.0, 4.0, 4.0]
    spacing[axis] = 0.7               # the shifted axis is the finest, so the shift is the largest distance
    ref = np.zeros((30, 30, 30), bool)
    ref[5:25, 5:25, 5:25] = True
    pred = np.roll(ref, 3, axis=axis)
    m = binary_metrics(pred, ref, spacing, tolerance_mm=1.0)
    assert m["hd95_mm"] == pytest.approx(3 * 0.7)
    assert m["vol_pred_mm3"] == pytest.approx(20 ** 3 * 0.7 * 16)


def test_2d_image_read_as_a_volume_is_measured_in_2d():
    pred, ref = shifted_rectangles()
    flat = binary_metrics(pred, ref, (3.0, 0.5), 1.0)
    as_volume = binary_metrics(pred[None], ref[None], (999.0, 3.0, 0.5), 1.0)
    assert as_volume == flat


def test_empty_mask_conventions():
    empty = np.zeros((10, 20), bool)
    blob = empty.copy()
    blob[2:5, 3:9] = True
    both = binary_metrics(empty, empty, (1.0, 2.0), 1.0)
    assert (both["dice"], both["nsd"], both["hd95_mm"], both["masd_mm"]) == (1.0, 1.0, 0.0, 0.0)
    assert both["ref_empty"] and both["pred_empty"] and math.isnan(both["rel_vol_diff"])
    diagonal = math.hypot(10 * 1.0, 20 * 2.0)
    for pred, ref in ((blob, empty), (empty, blob)):
        m = binary_metrics(pred, ref, (1.0, 2.0), 1.0)
        assert (m["dice"], m["nsd"]) == (0.0, 0.0)
        assert m["hd95_mm"] == m["masd_mm"] == pytest.approx(diagonal)
    assert binary_metrics(empty, blob, (1.0, 2.0), 1.0)["rel_vol_diff"] == -1.0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice to itself
def test_surface_distances_cross_checked_against_medpy_and_monai():
    """Second libraries: medpy's Dice and ASSD (same definitions as ours); MONAI's own HD95 and NSD entry points."""
    medpy = pytest.importorskip("medpy.metric.binary")
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape, spacing in (((48, 56), (0.7, 1.3)), ((18, 30, 26), (3.0, 0.8, 0.9))):
        ref = ndimage.binary_opening(rng.random(shape) > 0.55)
        pred = ndimage.binary_opening(rng.random(shape) > 0.55)
        m = binary_metrics(pred, ref, spacing, tolerance_mm=1.5)
        assert m["dice"] == pytest.approx(medpy.dc(pred, ref), rel=1e-12)
        assert m["masd_mm"] == pytest.approx(medpy.assd(pred, ref, spacing), rel=1e-6)
        p, r = (torch.from_numpy(a)[None, None].float() for a in (pred, ref))
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing).item()
        nsd = compute_surface_dice(p, r, [1.5], include_background=True, spacing=spacing).item()
        assert m["hd95_mm"] == pytest.approx(hd, rel=1e-6)
        assert m["nsd"] == pytest.approx(nsd, rel=1e-6)


def test_regions_are_unions_of_labels():
    seg = np.array([[0, 1, 2, 3]])
    rows = case_metrics(seg, seg, (1.0, 1.0), {"a": 1, "ab": [1, 2]}, {"a": 1.0, "ab": 1.0})
    assert [r["vol_ref_mm3"] for r in rows] == [1.0, 2.0]


# --- statistics ----------------------------------------------------------------------------------------------------
def synthetic_cases(n=12, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.9, n)
    rows = []
    other = np.clip(base + shift + 0.01 * rng.standard_normal(n), 0, 1)
    for trainer, values in (("base", base), ("same", base), ("other", other)):
        for i, v in enumerate(values):
            for cls in ("c1", "c2"):
                rows.append({"split": "cv", "fold": str(i % 3), "case": f"x{i}", "class": cls, "trainer": trainer,
                             "dice": v, "nsd": v, "hd95_mm": 10 * (1 - v), "masd_mm": 3 * (1 - v),
                             "ref_empty": False, "pred_empty": False, "tolerance_mm": 1.0})
    return pd.DataFrame(rows)


def test_identical_predictions_give_zero_differences_and_p_one():
    table = compare_to_baseline(synthetic_cases(shift=0.1), "base")
    same = table[table.trainer == "same"]
    assert len(same) == 8 and (same.mean_diff == 0).all() and (same.p_wilcoxon == 1).all()
    assert (same.p_holm == 1).all() and (same.ties == 12).all() and (same.wins == 0).all()
    assert all(ci == (0.0, 0.0) for ci in same.mean_diff_ci)


def test_a_better_trainer_wins_with_a_small_p_and_a_positive_ci():
    table = compare_to_baseline(synthetic_cases(shift=0.1), "base").set_index(["trainer", "metric", "class"])
    dice = table.loc[("other", "dice", "c1")]
    assert dice.mean_diff == pytest.approx(0.1, abs=0.01) and dice.mean_diff_ci[0] > 0.05
    assert dice.wins == 12 and dice.p_wilcoxon < 0.001
    hd = table.loc[("other", "hd95_mm", "c1")]
    assert hd.mean_diff < 0 and hd.wins == 12    # lower distance is a win
    ranks = mean_ranks(synthetic_cases(shift=0.1)).set_index(["class", "trainer"])["mean_rank"]
    assert ranks[("c1", "other")] == 1.0 and ranks[("c1", "base")] == ranks[("c1", "same")] == 2.5


def test_holm_and_wilcoxon_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, float("nan")])[0] == 0.5
    from scipy.stats import wilcoxon

    d = np.array([0.1, -0.05, 0.2, 0.3, 0.15, -0.02, 0.07])
    assert wilcoxon_p(d) == pytest.approx(wilcoxon(d).pvalue)


# --- the command on a hand-made nnU-Net results tree -------------------------------------------------------------
def test_benchmark_command_writes_the_report_and_recomputes_it(fake_env, capsys):
    from nnunet_dino.commands.cli import main
    from nnunet_dino.evaluation.report import read_cases

    root = fake_env({"base": 0, "worse": 2, "same": 0})
    out = root / "bench"
    assert main(["benchmark", "-d", "321", "--trainers", "base", "worse", "same", "--folds", "0", "1",
                 "--tolerance-mm-per-class", "lesion=2", "-o", str(out)]) == 0
    cases = read_cases(out / "cases.csv")
    assert len(cases) == 6 * 2 * 3 and set(cases.fold) == {"0", "1"}
    base = cases[cases.trainer == "base"]
    assert (base.dice == 1).all() and (base.hd95_mm == 0).all()
    assert (cases[cases["class"] == "lesion"].tolerance_mm == 2).all()
    worse = cases[(cases.trainer == "worse") & (cases["class"] == "organ")]
    assert worse.hd95_mm.tolist() == pytest.approx([2 * 0.8] * 6)     # a 2-voxel shift on 0.8 mm
    summary = json.loads((out / "summary.json").read_text())
    vs = {(r["trainer"], r["metric"], r["class"]): r for r in summary["versus_baseline"]}
    assert vs[("same", "dice", "organ")]["p_wilcoxon"] == 1 and vs[("same", "dice", "organ")]["mean_diff"] == 0
    assert vs[("worse", "dice", "organ")]["losses"] == 6
    costs = pd.read_csv(out / "costs.csv")
    assert costs.epoch_time_s.tolist() == [5.0] * 6 and costs.train_time_s.tolist() == [10.0] * 6
    assert costs.trainable_params_m.tolist() == pytest.approx([0.002] * 6)
    # "base" wrote costs.json as our trainers do; the others are read from their checkpoints (stock: nothing frozen)
    assert costs.frozen_params_m.tolist() == [22.0, 22.0, 0.0, 0.0, 0.0, 0.0]
    assert costs.peak_gpu_gib.tolist()[:2] == [1.5, 1.5] and costs.peak_gpu_gib[2:].isna().all()
    report = (out / "report.md").read_text()
    assert "Versus the baseline (base)" in report and "| organ | worse | dice |" in report
    for png in ("distributions_cv.png", "paired_cv.png", "worst_cv_1.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report
    assert "<table>" in (out / "report.html").read_text()
    # everything is recomputable from cases.csv (+ costs.csv and the recorded paths)
    again = root / "again"
    assert main(["benchmark", "--from-cases", str(out / "cases.csv"), "-o", str(again)]) == 0
    assert (again / "report.md").read_text() == report
    redo = json.loads((again / "summary.json").read_text())
    assert redo["versus_baseline"] == summary["versus_baseline"] and redo["per_fold"] == summary["per_fold"]


@pytest.mark.parametrize("case, message", [
    ("missing_fold", "has no validation for fold 1"),
    ("fold_out_of_range", "Fold 7 is not in"),
    ("other_splits", "its folds differ"),
    ("other_labels", "was trained with labels"),
    ("one_trainer", "needs a baseline and at least one other"),
    ("bad_tolerance", "NAME=MM with NAME one of organ, lesion"),
    ("no_splits", "splits_final.json does not exist; train at least one fold .* or add --train-missing"),
])
def test_benchmark_refusals(fake_env, case, message):
    from nnunet_dino.evaluation.benchmark import run_benchmark

    root = fake_env({"base": 0, "other": 1})
    model = root / "res" / "Dataset321_Fake" / "other__nnUNetPlans__2d"
    kwargs = {"folds": [0, 1], "trainers": ["base", "other"]}
    if case == "missing_fold":
        (model / "fold_1" / "validation" / "summary.json").unlink()
    elif case == "fold_out_of_range":
        kwargs["folds"] = [0, 7]
    elif case == "other_splits":
        next((model / "fold_0" / "validation").glob("*.nii.gz")).unlink()
    elif case == "other_labels":
        ds = json.loads((model / "dataset.json").read_text())
        ds["labels"]["tumour"] = 3
        (model / "dataset.json").write_text(json.dumps(ds))
    elif case == "one_trainer":
        kwargs["trainers"] = ["base"]
    elif case == "no_splits":
        (root / "pre" / "Dataset321_Fake" / "splits_final.json").unlink()
    elif case == "bad_tolerance":
        kwargs["tolerance_per_class"] = ["liver=2"]
    with pytest.raises(DinoUNetError, match=message):
        run_benchmark("321", kwargs["trainers"], ["nnUNetPlans"], "2d", kwargs["folds"], root / "out",
                      tolerance_per_class=kwargs.get("tolerance_per_class"))
    assert not (root / "out" / "cases.csv").exists()


def test_checkpoint_parameter_count_counts_shared_weights_once(tmp_path):
    from nnunet_dino.evaluation.costs import _unique_numel

    shared = torch.zeros(10, 3)
    torch.save({"encoder.w": shared, "decoder.encoder.w": shared, "head": torch.zeros(4), "n": torch.zeros(2).long()},
               tmp_path / "c.pth")
    assert _unique_numel(torch.load(tmp_path / "c.pth", weights_only=True)) == 34

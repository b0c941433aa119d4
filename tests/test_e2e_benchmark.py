"""nnunet-dino benchmark through the stock console scripts: --train-missing for the baseline, CV and test tables."""
import json

import pandas as pd
import pytest
from e2e_support import BIN, SMOKE, run

pytestmark = pytest.mark.e2e


def test_benchmark_trains_the_missing_baseline_and_reports(trained_smoke, tmp_path):
    env, raw = trained_smoke.env, trained_smoke.raw
    out = tmp_path / "bench"
    log = run([BIN / "nnunet-dino", "benchmark", "-d", "990", "--trainers", "nnUNetTrainer_smoke", SMOKE,
               "--folds", "0", "--train-missing", "--device", "cpu", "--test", raw / "imagesTs", raw / "labelsTs",
               "-o", out], env)
    assert "about to run:\n  nnUNetv2_train 990 2d 0 -tr nnUNetTrainer_smoke -p nnUNetPlans --npz -device cpu" in log
    assert "Epoch 1" in log and "Mean Validation Dice" in log  # nnU-Net's own progress is visible
    cases = pd.read_csv(out / "cases.csv", dtype={"fold": str})
    splits = json.loads((trained_smoke.root / "pre" / "Dataset990_Synthetic1ch" / "splits_final.json").read_text())
    cv = cases[cases.split == "cv"]
    assert set(cv.case) == set(splits[0]["val"]) and len(cv) == len(splits[0]["val"]) * 2 * 2
    assert len(cases[cases.split == "test"]) == 4 * 2 * 2 and set(cases[cases.split == "test"].fold) == {"ensemble"}
    assert cv.dice.between(0, 1).all() and (cv.hd95_mm >= 0).all()
    assert cv[cv.trainer == SMOKE].dice.mean() > 0.5  # the shared smoke model segments discs and squares
    summary = json.loads((out / "summary.json").read_text())
    assert {r["split"] for r in summary["versus_baseline"]} == {"cv", "test"}
    costs = pd.read_csv(out / "costs.csv")
    smoke = costs[costs.trainer == SMOKE].iloc[0]
    assert smoke.epochs == 8 and smoke.frozen_params_m > 0 and smoke.inference_s_per_case > 0
    written = json.loads((trained_smoke.model / "fold_0" / "costs.json").read_text())  # our trainers' own record
    assert len(written["epoch_times_s"]) == 8 and written["frozen_params_m"] == pytest.approx(smoke.frozen_params_m)
    assert costs[costs.trainer == "nnUNetTrainer_smoke"].iloc[0].frozen_params_m == 0
    report = (out / "report.md").read_text()
    assert "## Test set" in report and "## Cost" in report
    for png in ("distributions_cv.png", "paired_test.png", "worst_cv_1.png"):
        assert (out / png).is_file()
    # a trainer without any model is refused in one line (no traceback)
    msg = run([BIN / "nnunet-dino", "benchmark", "-d", "990", "--trainers", SMOKE, "nnUNetTrainerDinoUNet_B",
               "--folds", "0", "-o", tmp_path / "x"], env, ok=False)
    assert "nnunet-dino: error: nnUNetTrainerDinoUNet_B has no validation for fold 0" in msg and "Traceback" not in msg

"""benchmark --labelled through the stock console scripts: nnUNetv2_train trains the subset folds it adds, the user's
folds keep their exact text, a rerun trains nothing, and the report carries the learning curve."""
import json

import pandas as pd
import pytest
from e2e_support import BIN, run

pytestmark = pytest.mark.e2e
SHORT = "nnUNetTrainerDinoUNet_smoke_short"


def test_label_efficiency_folds_are_what_nnunet_trains_and_a_rerun_trains_nothing(trained_smoke, tmp_path):
    env = trained_smoke.env
    pre = trained_smoke.root / "pre" / "Dataset990_Synthetic1ch"
    splits_file = pre / "splits_final.json"
    before = splits_file.read_text()
    user = json.loads(before)
    cmd = [BIN / "nnunet-dino", "benchmark", "-d", "990", "--trainers", "nnUNetTrainer_smoke", SHORT, "--folds", "0",
           "--labelled", "3", "6", "--repeats", "1", "--train-missing", "--device", "cpu"]
    log = run(cmd + ["-o", tmp_path / "curve"], env)
    splits = json.loads(splits_file.read_text())
    assert splits[: len(user)] == user and splits_file.read_text().startswith(before.rstrip()[:-1].rstrip())
    sidecar = json.loads((pre / "splits_label_efficiency.json").read_text())
    added = {s["n_labelled"]: s for s in sidecar["subsets"]}
    assert sorted(added) == [3, 6] and set(added[3]["train"]) < set(added[6]["train"]) <= set(user[0]["train"])
    for n, subset in added.items():
        fold = subset["fold"]
        assert splits[fold] == {"train": subset["train"], "val": user[0]["val"]}
        assert f"nnUNetv2_train 990 2d {fold} -tr {SHORT} -p nnUNetPlans --npz -device cpu" in log
        for trainer in ("nnUNetTrainer_smoke", SHORT):
            fold_dir = trained_smoke.model.parent / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
            train_log = next(fold_dir.glob("training_log_*.txt")).read_text()
            assert f"Desired fold for training: {fold}" in train_log
            assert f"This split has {n} training and {len(user[0]['val'])} validation cases." in train_log
            assert {p.name[:-len(".png")] for p in (fold_dir / "validation").glob("*.png")} == set(user[0]["val"])
    cases = pd.read_csv(tmp_path / "curve" / "cases.csv", dtype={"fold": str, "labelled": str})
    assert set(cases.split) == {"curve"} and set(cases.labelled) == {"3", "6"}
    report = (tmp_path / "curve" / "report.md").read_text()
    assert "## Label efficiency: validation cases of the source folds" in report
    assert (tmp_path / "curve" / "learning_curve_curve.png").stat().st_size > 1000
    # the rerun reuses the subsets and the trained folds
    mtime = splits_file.stat().st_mtime_ns
    again = run(cmd + ["-o", tmp_path / "again"], env)
    assert "about to run" not in again and splits_file.stat().st_mtime_ns == mtime
    assert pd.read_csv(tmp_path / "again" / "cases.csv").dice.tolist() == cases.dice.tolist()

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Fast tier first: a unit failure reports within minutes, the end-to-end runs (marked e2e) come last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's weights folder or hash cache."""
    monkeypatch.delenv("nnUNet_dino_weights", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logging.getLogger("nnunet_dino").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory):
    """One trained smoke model (synthetic 1-channel dataset, folds 0 and 1, --npz) shared by the e2e tests that
    only need "a trained model"; they must not retrain or delete it."""
    from e2e_support import train_smoke_model

    return train_smoke_model(tmp_path_factory.mktemp("smoke_model"))


SPACING = (3.0, 0.8, 0.8)  # z, y, x of the arrays


def write_nifti(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING)))
    sitk.WriteImage(image, str(path))


def fake_tree(root: Path, trainers: dict, folds=(0, 1), n_cases=6) -> dict:
    """nnU-Net's folders for a 3-D NIfTI dataset with two labels; ``trainers`` maps name -> voxel shift of its
    predictions (0 = perfect)."""
    name = "Dataset321_Fake"
    raw, pre, res = root / "raw" / name, root / "pre" / name, root / "res" / name
    for d in (raw / "imagesTr", pre / "gt_segmentations"):
        d.mkdir(parents=True)
    labels = {"background": 0, "organ": 1, "lesion": 2}
    dataset_json = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "CT"}, "numTraining": n_cases}
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    cases = [f"c{i:02d}" for i in range(n_cases)]
    splits = [{"train": [c for j, c in enumerate(cases) if j % len(folds) != f], "val": cases[f::len(folds)]}
              for f in folds]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    refs = {}
    for i, case in enumerate(cases):
        seg = np.zeros((8, 40, 40), np.uint8)
        seg[2:6, 8 + i:30, 10:32] = 1
        seg[3:5, 14:20, 14:20 + i % 3] = 2
        refs[case] = seg
        write_nifti(pre / "gt_segmentations" / f"{case}.nii.gz", seg)
        write_nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", (seg * 100 + 5).astype(np.float32))
    plans = {"dataset_name": name, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO"}
    for trainer, shift in trainers.items():
        model = res / f"{trainer}__nnUNetPlans__2d"
        model.mkdir(parents=True)
        (model / "plans.json").write_text(json.dumps(plans))
        (model / "dataset.json").write_text(json.dumps(dataset_json))
        for f, split in zip(folds, splits):
            val = model / f"fold_{f}" / "validation"
            val.mkdir(parents=True)
            (val / "summary.json").write_text("{}")
            for case in split["val"]:
                write_nifti(val / f"{case}.nii.gz", np.roll(refs[case], shift, axis=2))
            torch.save({"network_weights": {"w": torch.zeros(1000, 2), "n": torch.zeros(3, dtype=torch.long)},
                        "logging": {"epoch_start_timestamps": [0.0, 10.0], "epoch_end_timestamps": [4.0, 16.0]}},
                       model / f"fold_{f}" / "checkpoint_final.pth")
            if trainer.startswith("base"):  # what our trainers write; other trainers are read from the checkpoint
                (model / f"fold_{f}" / "costs.json").write_text(json.dumps({
                    "trainable_params_m": 0.002, "frozen_params_m": 22.0, "epoch_times_s": [4.0, 6.0],
                    "peak_gpu_gib": 1.5}))
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res")}


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    def make(trainers, **kw):
        for k, v in fake_tree(tmp_path, trainers, **kw).items():
            monkeypatch.setenv(k, v)  # nnU-Net 2.8.1 reads its paths from the environment at each use
        return tmp_path
    return make


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def dino_model(tmp_path):
    """A trained Dino U-Net model folder in seconds: the 0.1.0 fixture checkpoint (tiny test backbone) with its
    plans, completed with what prediction and export read; ``make(trainer)`` names the checkpoint's trainer."""
    def make(trainer: str = "nnUNetTrainerDinoUNet_smoke", root: Path = tmp_path / "res") -> Path:
        plans = json.loads((FIXTURES / "v0.1.0_plans.json").read_text())
        plans["configurations"]["2d"] |= {"resampling_fn_data_kwargs": {"order": 3},
                                          "resampling_fn_probabilities_kwargs": {"order": 1}}
        plans["foreground_intensity_properties_per_channel"] = {"0": {"mean": 100.0, "std": 20.0}}
        model = root / f"{trainer}__nnUNetPlans__2d"
        (model / "fold_0").mkdir(parents=True)
        (model / "plans.json").write_text(json.dumps(plans))
        (model / "dataset.json").write_text((FIXTURES / "v0.1.0_dataset.json").read_text())
        ckpt = torch.load(FIXTURES / "v0.1.0_checkpoint_final.pth", weights_only=False)
        ckpt["trainer_name"] = trainer
        torch.save(ckpt, model / "fold_0" / "checkpoint_final.pth")
        return model
    return make


@pytest.fixture
def stock_dataset(tmp_path, monkeypatch):
    """A preprocessed dataset folder holding only what nnUNetv2_plan_and_preprocess writes first (stock plans and
    dataset.json), with the nnU-Net paths pointing at it."""
    from nnunet_dino.testing.synthetic import stock_plans

    pre = tmp_path / "pre" / "Dataset990_X"
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "channel_names": {"0": "x"},
                                                  "file_ending": ".png"}))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    return pre

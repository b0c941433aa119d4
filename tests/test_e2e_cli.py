"""Every stock nnU-Net command on a Dino U-Net model, through the real console scripts (CPU)."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_support import BIN, SMOKE, nnunet_env, run
from PIL import Image

from nnunet_dino.commands.demo import dice_scores
from nnunet_dino.nnunet.checkpoints import read_checkpoint
from nnunet_dino.testing.synthetic import make_synthetic_dataset, write_meta_checkpoint

pytestmark = pytest.mark.e2e


def dice_per_class(pred_dir: Path, label_dir: Path) -> list[float]:
    return list(dice_scores(pred_dir, label_dir, {"disc": 1, "square": 2}).values())


def untrained_dice(raw, tmp_path) -> list[float]:
    """Dice of an untrained network of the same trainer on the held-out images (the level training must beat)."""
    from nnunet_dino.network import DinoUNet

    torch.manual_seed(0)
    net = DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_weights="random").eval()
    out = tmp_path / "untrained"
    out.mkdir()
    for img in sorted((raw / "imagesTs").glob("*.png")):
        x = np.array(Image.open(img), dtype=np.float32)
        x = (x - x.mean()) / (x.std() + 1e-8)
        with torch.no_grad():
            pred = net(torch.from_numpy(x)[None, None]).argmax(1)[0].numpy().astype(np.uint8)
        Image.fromarray(pred).save(out / img.name.replace("_0000", ""))
    return dice_per_class(out, raw / "labelsTs")


def test_trained_model_folder(trained_smoke):
    """Small trainable-only checkpoints, the patch size rounded to the network multiple, the log says what ran."""
    model = trained_smoke.model
    stock = json.loads((trained_smoke.root / "pre" / "Dataset990_Synthetic1ch" / "nnUNetPlans.json").read_text())
    planned = stock["configurations"]["2d"]["patch_size"]
    used = json.loads((model / "plans.json").read_text())["configurations"]["2d"]["patch_size"]
    assert used == [32 * math.ceil(p / 32) for p in planned] and used != planned
    ckpt = read_checkpoint(model / "fold_0" / "checkpoint_final.pth")  # weights_only + the numpy allow-list
    assert not any(k.startswith("backbone.") for k in ckpt["network_weights"])
    assert ckpt["network_weights"]["_extra_state"]["backbone"] == "dinov3_test_tiny"
    assert (model / "fold_0" / "checkpoint_final.pth").stat().st_size < 30e6
    log = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    assert "Dino U-Net: backbone dinov3_test_tiny, weights RANDOM" in log and "patch size [96, 128]" in log


def test_resume_validate_predict_ensemble_export(trained_smoke, tmp_path):
    env, raw = trained_smoke.env, trained_smoke.raw
    out = run([BIN / "nnUNetv2_train", "990", "2d", "0", "-tr", SMOKE, "-device", "cpu", "--c"], env)
    assert "Mean Validation Dice" in out  # --c on a finished fold re-runs the final validation
    run([BIN / "nnUNetv2_train", "990", "2d", "1", "-tr", SMOKE, "-device", "cpu", "--val", "--val_best"], env)
    run([BIN / "nnUNetv2_train", "990", "2d", "1", "-tr", SMOKE, "-device", "cpu", "--val", "--npz"], env)

    preds = {}
    for fold in ("0", "1"):
        preds[fold] = tmp_path / f"pred_f{fold}"
        run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", preds[fold], "-d", "990", "-c", "2d",
             "-tr", SMOKE, "-f", fold, "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"], env)
    trained = dice_per_class(preds["0"], raw / "labelsTs")
    untrained = untrained_dice(raw, tmp_path)
    print("held-out Dice trained", trained, "untrained", untrained)
    assert np.mean(trained) > 0.6 > np.mean(untrained)

    run([BIN / "nnUNetv2_find_best_configuration", "990", "-c", "2d", "-tr", SMOKE, "-f", "0", "1"], env)
    run([BIN / "nnUNetv2_ensemble", "-i", preds["0"], preds["1"], "-o", tmp_path / "ens", "-np", "1"], env)
    assert np.mean(dice_per_class(tmp_path / "ens", raw / "labelsTs")) > 0.6

    zip_path = tmp_path / "model.zip"
    run([BIN / "nnUNetv2_export_model_to_zip", "-d", "990", "-o", zip_path, "-c", "2d", "-tr", SMOKE,
         "-f", "0", "1"], env)
    env2 = dict(env, nnUNet_results=str(tmp_path / "installed"))
    run([BIN / "nnUNetv2_install_pretrained_model_from_zip", zip_path], env2)
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path / "pred_inst", "-d", "990", "-c", "2d",
         "-tr", SMOKE, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env2)
    assert dice_per_class(tmp_path / "pred_inst", raw / "labelsTs") == pytest.approx(trained, abs=1e-6)


def test_3d_configuration_refused_before_any_folder(trained_smoke):
    """Asking for a 3d configuration names the fix (a 2-D dataset has none, so add one to a copy of the plans)."""
    env = trained_smoke.env
    pre = trained_smoke.root / "pre" / "Dataset990_Synthetic1ch"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlans3d"
    cfg3d = json.loads(json.dumps(plans["configurations"]["2d"]))
    cfg3d["patch_size"] = [16] + cfg3d["patch_size"]
    cfg3d["spacing"] = [1.0] + cfg3d["spacing"]
    cfg3d["architecture"]["arch_kwargs"]["conv_op"] = "torch.nn.modules.conv.Conv3d"
    plans["configurations"]["3d_fullres"] = cfg3d
    (pre / "nnUNetPlans3d.json").write_text(json.dumps(plans))
    out = run([BIN / "nnUNetv2_train", "990", "3d_fullres", "0", "-tr", SMOKE, "-device", "cpu", "-p", "nnUNetPlans3d"],
              env, ok=False)
    assert "Dino U-Net is 2D only" in out and "nnUNetv2_train DATASET 2d FOLD" in out
    assert "Traceback" not in out  # one line, not a traceback
    assert not (trained_smoke.root / "res" / "Dataset990_Synthetic1ch" / f"{SMOKE}__nnUNetPlans3d__3d_fullres").exists()


def test_meta_vits16_weights_folder_train_predict_and_refusals(tmp_path):
    weights = tmp_path / "weights"
    path = write_meta_checkpoint("dinov3_vits16", weights, seed=5)
    env = nnunet_env(tmp_path, nnUNet_dino_weights=str(weights))
    raw = make_synthetic_dataset(tmp_path / "raw", 991, num_cases=8, channels=3, test_cases=2)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "2", "-npfp", "2"], env)
    run([BIN / "nnUNetv2_train", "991", "2d", "0", "-tr", "nnUNetTrainerDinoUNet_S_smoke", "-device", "cpu"], env)
    model = tmp_path / "res" / "Dataset991_Synthetic3ch" / "nnUNetTrainerDinoUNet_S_smoke__nnUNetPlans__2d"
    assert path.name in (model / "plans.json").read_text()  # the file name travels with the model folder
    pred_cmd = [BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path / "pred", "-d", "991", "-c", "2d",
                "-tr", "nnUNetTrainerDinoUNet_S_smoke", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
    run(pred_cmd, env)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2

    # another ViT-S file of the same size copied over the recorded one, its mtime restored (touch -r): refused
    other = write_meta_checkpoint("dinov3_vits16", tmp_path / "other", seed=6, with_hash=False)
    st = path.stat()
    assert other.stat().st_size == st.st_size
    shutil.copyfile(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = run(pred_cmd, env, ok=False)
    assert "Hash mismatch" in out or "differ from those this model was trained with" in out
    # no weights at all: the error names the file, the variable and the folder
    path.unlink()
    out = run(pred_cmd, env, ok=False)
    assert path.name in out and "nnUNet_dino_weights" in out
    out = run([BIN / "nnUNetv2_train", "991", "2d", "1", "-tr", "nnUNetTrainerDinoUNet_S_smoke", "-device", "cpu"],
              env, ok=False)
    assert "No weights found for backbone dinov3_vits16" in out


def test_volumetric_dataset_through_the_2d_configuration(tmp_path):
    """3-D NIfTI data, stock 2d plans: trains on slices, predicts whole volumes."""
    import SimpleITK as sitk

    from nnunet_dino.testing.synthetic import make_synthetic_volume_dataset

    env = nnunet_env(tmp_path)
    raw = make_synthetic_volume_dataset(tmp_path / "raw", 993)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "993", "-c", "2d", "-np", "2", "-npfp", "2"], env)
    run([BIN / "nnUNetv2_train", "993", "2d", "0", "-tr", SMOKE, "-device", "cpu"], env)
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", tmp_path / "pred", "-d", "993", "-c", "2d",
         "-tr", SMOKE, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    dices = []
    for lab in sorted((raw / "labelsTs").glob("*.nii.gz")):
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(lab))) == 1
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / lab.name))) == 1
        assert p.shape == y.shape == (20, 72, 80)
        dices.append(2 * (p & y).sum() / (p.sum() + y.sum()))
    print("volumetric held-out Dice", dices)
    assert np.mean(dices) > 0.7

    # a new user's next step on their own 3-D data without Meta's files: plans for another backbone with random
    # weights, then the lines plans prints, as printed (the compare and export lines for the checked model on fold 0:
    # the printed ones name the full training and five folds)
    import re
    import subprocess

    printed = run([BIN / "nnunet-dino", "plans", "-d", "993", "--backbone", "dinov2_vits14", "--weights", "random"],
                  env)
    assert "weights: RANDOM" in printed and "token grid:" in printed
    lines = dict(re.findall(r"^(check|train|predict|compare|export): +(.+)$", printed, flags=re.M))
    assert list(lines) == ["check", "train", "predict", "compare", "export"] and str(BIN) in lines["check"]
    plans = "nnUNetPlans_dinov2_vits14_random"
    assert f"-tr nnUNetTrainerDinoUNet -p {plans}" in lines["train"]
    checked = {"predict": lines["predict"].replace("-i IN -o OUT", f"-i {raw / 'imagesTs'} -o {tmp_path / 'pred2'}")
                                          .replace("-tr nnUNetTrainerDinoUNet ", "-tr nnUNetTrainerDinoUNet_check "),
               "compare": lines["compare"].replace("nnUNetTrainer nnUNetTrainerDinoUNet ",
                                                   "nnUNetTrainer_smoke nnUNetTrainerDinoUNet_check ")
                                          .replace("--folds 0 1 2 3 4", "--folds 0"),
               "export": lines["export"].replace("/nnUNetTrainerDinoUNet__", "/nnUNetTrainerDinoUNet_check__")}
    assert all(checked[k] != lines[k] for k in checked)
    script = "\n".join(["set -euo pipefail", lines["check"], checked["predict"], checked["compare"], checked["export"]])
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for lab in sorted((raw / "labelsTs").glob("*.nii.gz")):
        assert sitk.ReadImage(str(tmp_path / "pred2" / lab.name)).GetSize() == sitk.ReadImage(str(lab)).GetSize()
    assert (tmp_path / f"benchmark_{plans}" / "report.md").is_file()
    assert (tmp_path / f"exported_{plans}" / "fold_0.onnx").is_file()

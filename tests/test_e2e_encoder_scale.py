"""encoder_scale end to end: plans written by `nnunet-dino plans --encoder-scale 2 --weights random`, a model trained
on them through stock nnUNetv2_train, predicted through stock nnUNetv2_predict, and exported to ONNX with the same
labels (the network is rebuilt from the model folder's plans in every fresh process)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_dino.commands.export import export_model, load_fold
from nnunet_dino.testing.synthetic import make_synthetic_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.e2e
def test_a_model_trained_with_encoder_scale_predicts_and_exports_with_the_same_labels(tmp_path):
    from e2e_support import BIN, nnunet_env, run

    env = nnunet_env(tmp_path)
    raw = make_synthetic_dataset(tmp_path / "raw", 994, num_cases=10, channels=1)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "994", "-c", "2d", "-np", "2", "-npfp", "2"], env)
    out = run([BIN / "nnunet-dino", "plans", "-d", "994", "--backbone", "dinov3_test_tiny", "--weights", "random",
               "--encoder-scale", "2"], env)
    plans = next(line.split("-p ")[1].split()[0] for line in out.splitlines() if line.startswith("train:"))
    patch = json.loads((tmp_path / "pre" / raw.name / f"{plans}.json").read_text())["configurations"]["2d"][
        "patch_size"]
    assert f"token grid: {patch[0] // 8} x {patch[1] // 8} per {patch[0]} x {patch[1]} patch (encoder_scale 2)" in out
    trainer = "nnUNetTrainerDinoUNet_smoke_short"
    run([BIN / "nnUNetv2_train", "994", "2d", "0", "-tr", trainer, "-p", plans, "-device", "cpu"], env)
    model = tmp_path / "res" / raw.name / f"{trainer}__{plans}__2d"
    assert json.loads((model / "plans.json").read_text())["configurations"]["2d"]["architecture"]["arch_kwargs"][
        "encoder_scale"] == 2

    network = load_fold(model, 0)[0]  # rebuilt from the model folder's plans: the ViT sees the patch at 2x
    seen = []
    network.backbone.register_forward_hook(lambda m, args, o: seen.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        assert network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)
    assert seen == [(2 * patch[0], 2 * patch[1])]

    pred = tmp_path / "pred"
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred, "-d", "994", "-c", "2d", "-tr", trainer,
         "-p", plans, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    exported = export_model(model, [0], tmp_path / "onnx")
    sys.path.insert(0, str(EXAMPLES))
    import onnx_predict
    from PIL import Image

    sessions, cfg = onnx_predict.load(exported)
    same = total = 0
    for image_file in sorted((raw / "imagesTs").glob("*_0000.png")):
        image, spacing = onnx_predict.read_case(image_file, 1)
        seg = onnx_predict.segment(sessions, image, spacing, cfg)
        expected = np.asarray(Image.open(pred / image_file.name.replace("_0000.png", ".png")))
        same += int((seg[0] == expected).sum())
        total += expected.size
    assert total and same / total >= 0.999, f"labels agree on {same / total:.5f} of pixels"

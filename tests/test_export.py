"""nnunet-dino export: refusals (fast) and, on the shared trained smoke model, ONNX/TorchScript against PyTorch and the
onnxruntime + numpy example against nnUNetv2_predict (e2e)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_dino.commands.export import export_model, load_fold
from nnunet_dino.errors import DinoUNetError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def fake_model(root: Path, trainer: str = "nnUNetTrainer") -> Path:
    model = root / f"{trainer}__nnUNetPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_X", "configurations": {}}))
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".png"}))
    torch.save({"trainer_name": trainer, "init_args": {"configuration": "2d"}, "network_weights": {}},
               model / "fold_0" / "checkpoint_final.pth")
    return model


@pytest.mark.parametrize("kwargs, message", [
    ({}, "not a Dino U-Net trainer"),
    ({"folds": [3]}, "fold_3/checkpoint_final.pth does not exist; folds with checkpoint_final.pth: 0"),
    ({"size": [100, 128]}, "two positive multiples of 32"),
    ({"fmt": "torchscript"}, "traced at one size; pass --size"),
    ({"fmt": "tflite"}, "valid choices: onnx, torchscript"),
    ({"dtype": "bfloat16"}, "no bfloat16 kernels"),
])
def test_export_refusals(tmp_path, kwargs, message):
    model = fake_model(tmp_path)
    with pytest.raises(DinoUNetError, match=message):
        export_model(model, kwargs.pop("folds", [0]), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_refuses_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(DinoUNetError, match="not an nnU-Net model folder"):
        export_model(tmp_path, [0], tmp_path / "out")


@pytest.mark.e2e
def test_onnx_and_example_reproduce_nnunet_predict(trained_smoke, tmp_path):
    """ONNX and TorchScript graphs equal PyTorch; the numpy/onnxruntime example equals nnUNetv2_predict."""
    import onnxruntime as ort
    from e2e_support import BIN, SMOKE, run

    model, raw = trained_smoke.model, trained_smoke.raw
    out = export_model(model, [0], tmp_path / "onnx")
    cfg = json.loads((out / "preprocessing.json").read_text())
    assert cfg["patch_size"] == [96, 128] and cfg["normalization_schemes"] == ["ZScoreNormalization"]
    assert cfg["sliding_window"]["mirror_axes"] == [0, 1] and cfg["labels"]["square"] == 2
    network = load_fold(model, 0)[0]
    session = ort.InferenceSession(str(out / "fold_0.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 1, 96, 128), (3, 1, 64, 224)):  # any multiple of 32, any batch
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    traced = torch.jit.load(str(export_model(model, [0], tmp_path / "ts", fmt="torchscript", size=[96, 128])
                                / "fold_0.pt"))
    x = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), network(x), atol=1e-5, rtol=1e-5)

    pred_dir = tmp_path / "nnunet"
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs", "-o", pred_dir, "-d", "990", "-c", "2d", "-tr", SMOKE,
         "-f", "0", "-device", "cpu", "--save_probabilities"], trained_smoke.env)
    sys.path.insert(0, str(EXAMPLES))
    import onnx_predict

    sessions, cfg = onnx_predict.load(out)
    same = total = 0
    worst = 0.0
    for image_file in sorted((raw / "imagesTs").glob("*_0000.png")):
        image, spacing = onnx_predict.read_case(image_file, 1)
        seg, probs = onnx_predict.segment(sessions, image, spacing, cfg, return_probabilities=True)
        case = image_file.name.replace("_0000.png", "")
        from PIL import Image

        expected = np.asarray(Image.open(pred_dir / f"{case}.png"))
        same += int((seg[0] == expected).sum())
        total += expected.size
        worst = max(worst, float(np.abs(np.load(pred_dir / f"{case}.npz")["probabilities"] - probs).max()))
    assert same / total >= 0.999, f"labels agree on {same / total:.5f} of pixels"
    assert worst < 5e-3, f"probabilities differ by {worst}"  # both accumulate in float16 (nnU-Net's choice)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated upstream; still offered
def test_half_precision_backbone_traces_like_eager(tmp_path):
    """--dtype casts the frozen backbone only (as backbone_dtype in training); the traced graph equals eager."""
    from nnunet_dino.backbones import cast_vit
    from nnunet_dino.commands.export import Segmenter, _export_torchscript
    from nnunet_dino.network import DinoUNet

    torch.manual_seed(0)
    net = DinoUNet(1, 3, backbone="dinov3_test_tiny", backbone_weights="random").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        full = net(x)
        cast_vit(net.backbone.vit, "dinov3", torch.bfloat16)
        eager = Segmenter(net)(x)
        _export_torchscript(Segmenter(net), x, tmp_path / "net.pt")
        traced = torch.jit.load(str(tmp_path / "net.pt"))(x)
    assert traced.dtype == torch.float32 and torch.equal(traced, eager)
    assert 0 < (eager - full).abs().max() < 0.05  # bf16 backbone: close to, not equal to, float32

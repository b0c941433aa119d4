"""The demo's dataset builder on the real MNI152 files nilearn ships, and its one-line errors."""
import json

import numpy as np
import pytest
from PIL import Image

from nnunet_dino.commands import demo
from nnunet_dino.commands.cli import main


def test_build_dataset_from_nilearn(tmp_path):
    out = demo.build_dataset(tmp_path)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2} and meta["file_ending"] == ".png"
    train, test = sorted((out / "labelsTr").glob("*.png")), sorted((out / "labelsTs").glob("*.png"))
    assert meta["numTraining"] == len(train) and len(train) > 50 and len(test) >= 10
    assert len(list((out / "imagesTr").glob("*_0000.png"))) == len(train)
    z_test = sorted(int(p.stem[5:]) for p in test)
    z_train = sorted(int(p.stem[5:]) for p in train)
    assert max(z_test) - min(z_test) > 2 * len(test)  # two separate slabs...
    assert sum(1 for a, b in zip(z_test, z_test[1:]) if b - a > 2) == 1  # ...each contiguous
    lab = np.array(Image.open(test[len(test) // 2]))
    img = np.array(Image.open(out / "imagesTs" / test[len(test) // 2].name.replace(".png", "_0000.png")))
    assert lab.shape == img.shape == (233, 197) and set(np.unique(lab)) == {0, 1, 2}
    assert img[lab == 2].mean() > img[lab == 1].mean() > img[lab == 0].mean()  # T1: WM brighter than GM
    assert demo.build_dataset(tmp_path) == out  # reused, not rebuilt
    assert not set(z_test) & set(z_train)


def test_demo_errors(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--folder", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "--folder" in err and err.count("\n") == 1
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.DinoUNetError, match="pip install nilearn"):
        demo.nilearn_data_dir()


def test_trainer_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    assert demo.choose_trainer("auto", "cuda") == "nnUNetTrainerDinoUNet_smoke"  # no ViT-S file
    (tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth").write_bytes(b"")
    assert demo.choose_trainer("auto", "cuda") == "nnUNetTrainerDinoUNet"
    assert demo.choose_trainer("auto", "cpu") == "nnUNetTrainerDinoUNet_smoke"
    assert demo.choose_trainer("vits16", "cpu") == "nnUNetTrainerDinoUNet"


def test_overlay_has_a_legend_and_dice_per_slice(tmp_path):
    import matplotlib.pyplot as plt

    out = demo.build_dataset(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for lab in (out / "labelsTs").glob("*.png"):  # a prediction that misses all white matter
        y = np.array(Image.open(lab))
        Image.fromarray(np.where(y == 2, 0, y).astype(np.uint8)).save(pred / lab.name)
    fig = demo.overlay_figure(out, pred)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["grey matter", "white matter"]
    titles = [ax.get_title() for ax in fig.axes if "prediction" in ax.get_title()]
    assert len(titles) == 3 and all(t.endswith("Dice 1.00 / 0.00") for t in titles)
    plt.close(fig)
    scores = demo.dice_scores(pred, out / "labelsTs")
    assert scores == {"grey_matter": 1.0, "white_matter": 0.0}
    summary = demo.write_summary(tmp_path / "summary.md", scores, 16, "T", {"overlay": tmp_path / "overlay.png"})
    text = summary.read_text()
    assert "| grey matter | 1.000 |" in text and "| **mean** | **0.500** |" in text and "overlay.png" in text


def test_backbone_plans_for_the_demo(tmp_path):
    from nnunet_dino.testing.synthetic import stock_plans

    pre = tmp_path / demo.DATASET_NAME
    pre.mkdir()
    (pre / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    name = demo.write_backbone_plans(tmp_path, "dinov2_vits14", "random")
    assert name == "nnUNetPlans_demo_dinov2_vits14_random"
    cfg = json.loads((pre / f"{name}.json").read_text())["configurations"]["2d"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert (kwargs["backbone"], kwargs["backbone_weights"]) == ("dinov2_vits14", "random")
    assert cfg["data_identifier"] == "nnUNetPlans_2d"  # the stock preprocessed data is reused
    with pytest.raises(demo.DinoUNetError, match="valid choices"):
        demo.write_backbone_plans(tmp_path, "dinov9", None)

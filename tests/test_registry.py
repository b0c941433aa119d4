"""One list of backbones: the registry names each backbone's files, weights origin, dtype and pinning trainer; the
plans say which network is built; the printed commands work for every preset and backbone."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nnunet_dino.backbones import BACKBONES
from nnunet_dino.commands.cli import main


def test_weights_lists_every_backbone_by_its_own_file_naming(tmp_path, capsys):
    (tmp_path / "meddinov3_vitb16_ct3m.pth").write_bytes(b"x")   # MedDINOv3's name, not Meta's DINOv3 pattern
    (tmp_path / "dinov2_vitb14_pretrain.pth").write_bytes(b"x")
    (tmp_path / "dinov3_vits16.pth").write_bytes(b"x")           # a DINOv3 file saved under a shortened name
    assert main(["weights", "--folder", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "found" in rows["meddinov3_vitb16_ct3m"] and "meddinov3_vitb16_ct3m.pth" in rows["meddinov3_vitb16_ct3m"]
    assert "found" in rows["dinov2_vitb14"]
    assert "missing" in rows["dinov3_vits16"] and "Meta's DINOv3 release" in rows["dinov3_vits16"]
    assert "missing" in rows["dinov2_vits14"] and "openly licensed DINOv2 release" in rows["dinov2_vits14"]
    assert rows["?"].split(None, 3)[1:] == ["not", "recognised", "dinov3_vits16.pth: rename it to "
                                                                 "dinov3_vits16_pretrain_lvd1689m-<8 hex>.pth"]


def test_missing_weights_name_the_familys_origin_and_file(monkeypatch, tmp_path):
    from nnunet_dino.backbones import build_backbone
    from nnunet_dino.errors import DinoUNetError

    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path))
    with pytest.raises(DinoUNetError, match=r"put the file dinov2_vits14_pretrain\.pth .* Meta's openly licensed "
                                            r"DINOv2 release"):
        build_backbone("dinov2_vits14")
    with pytest.raises(DinoUNetError, match=r"put the file meddinov3_vitb16_ct3m\.pth .* MedDINOv3 authors' release"):
        build_backbone("meddinov3_vitb16_ct3m")


def test_pinning_trainers_come_from_the_registry():
    import nnunet_dino.ext_trainers.nnunet_dino_trainers as shim
    from nnunet_dino.nnunet.trainers import nnUNetTrainerDinoUNet

    pinned = {name: cls for name, cls in vars(shim).items() if isinstance(cls, type)
              and issubclass(cls, nnUNetTrainerDinoUNet) and cls.__dict__.get("backbone_name")}
    for spec in BACKBONES.values():
        if spec.random_only:
            assert spec.trainer is None
            continue
        cls = getattr(shim, spec.trainer)
        assert (cls.backbone_name, cls.backbone_dtype) == (spec.name, spec.default_dtype)
        assert cls.__module__ == "nnunet_dino.nnunet.trainers" and cls.__qualname__ == spec.trainer  # picklable
    # no hand-written per-backbone trainer besides the generated ones and the test/smoke trainers
    assert {n for n in pinned if "smoke" not in n} == {s.trainer for s in BACKBONES.values() if s.trainer}
    assert nnUNetTrainerDinoUNet.backbone_name is None  # follows the plans
    assert shim.nnUNetTrainerDinoUNet_7B.backbone_dtype == "bfloat16"
    assert shim.nnUNetTrainerDinoUNet_B.__doc__.startswith("dinov3_vitb16, pinned")


def _choices():
    from nnunet_dino.nnunet.plans import preset_names

    return [["--preset", p] for p in preset_names()] + [["--backbone", b] for b in BACKBONES] + [
        ["--backbone", "dinov2_vits14", "--preset", "hires512"]]


@pytest.mark.parametrize("choice", _choices(), ids=lambda c: "-".join(c[1::2]))
def test_the_printed_trainer_builds_the_network_the_written_plans_name(stock_dataset, capsys, choice):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dino.commands.export import trainer_class

    assert main(["plans", "-d", "990", *choice]) == 0
    out = capsys.readouterr().out
    printed = re.findall(r"nnUNetv2_train 990 2d 0 -tr (\S+) -p (\S+)", out)
    assert [t for t, _ in printed] == ["nnUNetTrainerDinoUNet_check", "nnUNetTrainerDinoUNet"]  # check, then train
    for trainer, plans_name in printed:
        plans = json.loads((stock_dataset / f"{plans_name}.json").read_text())
        kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
        expected = choice[choice.index("--backbone") + 1] if "--backbone" in choice else kwargs["backbone"]
        assert kwargs["backbone"] == expected
        kwargs["backbone_weights"] = "random"  # the architecture is the question here, not Meta's files
        manager = PlansManager(plans)
        with torch.device("meta"):
            net = trainer_class(trainer).build_network_architecture(manager, manager.get_configuration("2d"), 1, 2)
        assert net.backbone.name == expected
        dtype = BACKBONES[expected].default_dtype or "float32"
        assert str(next(net.backbone.vit.parameters()).dtype) == f"torch.{dtype}"


def test_an_alias_with_another_backbone_is_refused(stock_dataset, capsys):
    assert main(["plans", "-d", "990", "--preset", "dinounet_b", "--backbone", "dinov2_vits14"]) == 2
    assert "pass --backbone dinov2_vits14 --preset stock" in capsys.readouterr().err


def test_export_finds_a_users_own_subclass_on_nnUNet_extTrainer(dino_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "my_trainers"
    folder.mkdir()
    (folder / "mine.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_smoke\n\n\n"
        "class MyDinoTrainer(nnUNetTrainerDinoUNet_smoke):\n    epochs = 3\n\n\n"
        "class MyStockTrainer(nnUNetTrainer):\n    pass\n")
    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    model = dino_model("MyDinoTrainer")
    assert main(["export", "-m", str(model), "--format", "torchscript", "--size", "64", "64",
                 "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "fold_0.pt").is_file()
    stock = dino_model("MyStockTrainer", root=tmp_path / "res2")
    assert main(["export", "-m", str(stock), "-o", str(tmp_path / "out2")]) == 2
    assert "trained with MyStockTrainer, not a Dino U-Net trainer" in capsys.readouterr().err
    missing = dino_model("NobodysTrainer", root=tmp_path / "res3")
    assert main(["export", "-m", str(missing), "-o", str(tmp_path / "out3")]) == 2
    assert "put the folder of that trainer's .py on nnUNet_extTrainer" in capsys.readouterr().err
    assert not Path(tmp_path / "out2").exists() and not Path(tmp_path / "out3").exists()


def test_random_trainer_keeps_any_backbone_the_plans_name():
    from nnunet_dino.errors import DinoUNetError
    from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_random, nnUNetTrainerDinoUNet_S_random

    block = {"network_class_name": "nnunet_dino.network.DinoUNet", "arch_kwargs": {"backbone": "dinov2_vits14"},
             "_kw_requires_import": []}
    kwargs = nnUNetTrainerDinoUNet_random.dino_arch(block)["arch_kwargs"]
    assert (kwargs["backbone"], kwargs["backbone_weights"]) == ("dinov2_vits14", "random")
    with pytest.raises(DinoUNetError,
                       match="train them with nnUNetTrainerDinoUNet .* or nnUNetTrainerDinoUNet_DINOv2S"):
        nnUNetTrainerDinoUNet_S_random.dino_arch({**block, "arch_kwargs": {"backbone": "dinov2_vits14"}})

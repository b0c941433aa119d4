"""Plans presets and writer, trainer network building from stock/preset plans, the nnunet-dino CLI."""
import json

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_dino.backbones import BACKBONES
from nnunet_dino.commands.cli import main
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import DinoUNet
from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_smoke
from nnunet_dino.nnunet.environment import trainer_folder
from nnunet_dino.nnunet.plans import (
    apply_trainer_pins,
    dino_architecture,
    load_preset,
    make_plans,
    preset_names,
    round_patch_size,
)
from nnunet_dino.nnunet.trainers import nnUNetTrainerDinoUNet
from nnunet_dino.testing.synthetic import STOCK_ARCH, stock_plans


def test_round_patch_size():
    assert round_patch_size([100, 150]) == [128, 160] and round_patch_size([20, 64]) == [32, 64]
    assert round_patch_size([20, 64], multiple=16) == [32, 64] and round_patch_size([40], multiple=16) == [48]


def test_trainer_builds_from_stock_plans_without_init_of_backbone():
    pm = PlansManager(stock_plans())
    net = nnUNetTrainerDinoUNet_smoke.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    assert isinstance(net, DinoUNet) and net.backbone.name == "dinov3_test_tiny"
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_stock_only_keys_dropped_in_one_place_and_network_refuses_them():
    block = dino_architecture(STOCK_ARCH)
    assert not {"n_stages", "kernel_sizes", "strides", "n_conv_per_stage"} & set(block["arch_kwargs"])
    assert block["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256]
    assert block["arch_kwargs"]["n_conv_per_stage_decoder"] == [2, 2, 2]
    dino = {"network_class_name": "nnunet_dino.network.DinoUNet", "arch_kwargs": {"backbone": "x", "n_stages": 5}}
    assert "n_stages" not in dino_architecture(dino)["arch_kwargs"]
    with pytest.raises(TypeError):
        DinoUNet(1, 2, backbone="dinov3_test_tiny", n_stages=5)


def test_trainer_pins_fill_open_values_and_refuse_contradictions():
    block = dino_architecture(STOCK_ARCH)
    apply_trainer_pins(block, {"backbone": "dinov3_vitb16", "backbone_dtype": None}, "T")
    assert block["arch_kwargs"]["backbone"] == "dinov3_vitb16" and "backbone_dtype" not in block["arch_kwargs"]
    apply_trainer_pins(block, {"backbone": "dinov3_vitb16"}, "T")  # agreeing pin: fine
    with pytest.raises(DinoUNetError, match="plans are for backbone_dtype float32 but T pins bfloat16"):
        block["arch_kwargs"]["backbone_dtype"] = "float32"
        apply_trainer_pins(block, {"backbone_dtype": "bfloat16"}, "T")


@pytest.mark.parametrize("op,value", [("nonlin", "subprocess.call"), ("norm_op", "os.system"),
                                      ("nonlin", "torch.nn.functional.relu")])
def test_plans_ops_allow_list(op, value):
    dino = {"network_class_name": "nnunet_dino.network.DinoUNet", "arch_kwargs": {op: value}}
    with pytest.raises(DinoUNetError, match="only torch.nn module classes are allowed"):
        dino_architecture(dino)


def test_presets_and_plans_writer(tmp_path, monkeypatch, capsys):
    assert {"dinounet_s", "dinounet_s_512"} <= set(preset_names())
    for name in preset_names():  # presets hold only their overrides (recipes: nothing about the backbone)
        preset = load_preset(name)
        assert preset["backbone"] in BACKBONES and set(preset) <= {"description", "backbone", "target_shape",
                                                                   "patch_size", "batch_size", "arch_kwargs",
                                                                   "plans_name"}
    pre = tmp_path / "pre" / "Dataset990_X"
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert main(["plans", "-d", "Dataset990_X"]) == 0
    plans = json.loads((pre / "nnUNetPlans_dinounet_s.json").read_text())
    cfg = plans["configurations"]["2d"]
    assert plans["plans_name"] == "nnUNetPlans_dinounet_s" and cfg["patch_size"] == [128, 160]
    assert cfg["data_identifier"] == "nnUNetPlans_2d"  # same spacing: the stock preprocessed data is reused
    written = cfg["architecture"]["arch_kwargs"]
    assert written["backbone"] == "dinov3_vits16"
    # every plannable keyword written out with the reference's values (docs: reference-architecture.md); features,
    # conv bias, decoder convs and ops donated by the stock plans; weights and dtype left open (a pin may fill them)
    assert written == {
        "backbone": "dinov3_vits16", "features_per_stage": [32, 64, 128, 256], "conv_bias": True,
        "n_conv_per_stage_decoder": [2, 2, 2], "decoder_kernel_size": 3, "spm_channels": 64, "deform_num_heads": 16,
        "deform_num_points": 4, "deform_value_ratio": 0.5, "ffn_ratio": 0.25, "drop_path_rate": 0.3,
        "extra_extractors": 2, "add_vit_features": True, "checkpoint_extractors": True, "fapm_rank": 256,
        "channel_mode": "learned", "pad_multiple": 32, "backbone_autocast": True, "encoder_scale": 2,
        "vit_feature_norm": False,
        "conv_op": "torch.nn.modules.conv.Conv2d", "norm_op": STOCK_ARCH["arch_kwargs"]["norm_op"],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    assert main(["plans", "-d", "Dataset990_X", "--preset", "dinounet_s_512"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_preprocess -d Dataset990_X -plans_name nnUNetPlans_dinounet_s_512 -c 2d" in out
    hi = json.loads((pre / "nnUNetPlans_dinounet_s_512.json").read_text())["configurations"]["2d"]
    assert hi["patch_size"] == [512, 512] and hi["spacing"] == pytest.approx([0.4, 0.4])
    assert hi["data_identifier"] == "nnUNetPlans_dinounet_s_512_2d"
    # a preset for another backbone than a pinning trainer's is refused with the fix, naming the trainers to use
    pm = PlansManager(json.loads((pre / "nnUNetPlans_dinounet_s.json").read_text()))
    with pytest.raises(DinoUNetError, match="plans are for backbone dinov3_vits16 but nnUNetTrainerDinoUNet_smoke pins "
                                            "dinov3_test_tiny; train them with nnUNetTrainerDinoUNet .* or "
                                            "nnUNetTrainerDinoUNet_S, or write plans for dinov3_test_tiny: "
                                            "nnunet-dino plans -d DATASET --backbone dinov3_test_tiny"):
        nnUNetTrainerDinoUNet_smoke.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False)
    arch = nnUNetTrainerDinoUNet.dino_arch(plans["configurations"]["2d"]["architecture"])
    assert arch["arch_kwargs"]["fapm_rank"] == 256


def test_plans_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert main(["plans", "-d", "Dataset990_X", "--preset", "nope"]) == 2
    assert "valid choices: hires512, stock, dinounet_7b" in capsys.readouterr().err
    assert main(["plans", "-d", "Dataset990_X"]) == 2
    assert "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
    with pytest.raises(DinoUNetError, match="2D only"):
        dino_architecture({"network_class_name": "x", "arch_kwargs": {"conv_op": "torch.nn.modules.conv.Conv3d"}})
    with pytest.raises(DinoUNetError, match="stock plans have no '2d'"):
        make_plans({"configurations": {}}, load_preset("dinounet_s"), "x")


def test_env_weights_info_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", "/some/other")
    assert main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"export nnUNet_extTrainer=/some/other:{trainer_folder()}"
    assert main(["env", "--check"]) == 1
    capsys.readouterr()
    from nnunet_dino.testing.synthetic import write_meta_checkpoint
    f = write_meta_checkpoint("dinov3_vits16", tmp_path)
    assert main(["weights", "--folder", str(tmp_path), "--verify"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        name, status, *rest = line.split()
        rows.setdefault(name, []).append((status, rest[0] if rest else ""))
    assert rows["dinov3_vits16"] == [("verified", f.name)] and rows["dinov3_vitb16"][0][0] == "missing"
    assert main(["weights", "--folder", str(tmp_path)]) == 0  # listing only: the verified hash is remembered
    assert "verified" in capsys.readouterr().out
    assert set(rows) == set(BACKBONES)
    assert main(["info", "--backbone", "dinov3_vits16", "--meta"]) == 0
    parts = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        part, value, unit = line.split()
        assert unit == "M"
        parts[part] = float(value) * 1e6
    # the reference's counts for Dino U-Net-S (reference-architecture.md): 3.70 + 1.39 + 0.35 + 0.76 = 6.20 M
    for part, ref in [("adapter", 3.70e6), ("fapm", 1.39e6), ("upsampling", 0.35e6), ("decoder", 0.76e6),
                      ("total", 6.20e6)]:
        assert abs(parts[part] - ref) / ref < 0.02, part
    assert main(["weights", "--folder", str(tmp_path / "nope")]) == 2


def test_shim_reexports_every_trainer():
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("shim", Path(trainer_folder()) / "nnunet_dino_trainers.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    names = [n for n in dir(shim) if n.startswith("nnUNetTrainerDinoUNet")]
    assert {"nnUNetTrainerDinoUNet", "nnUNetTrainerDinoUNet_B", "nnUNetTrainerDinoUNet_7B",
            "nnUNetTrainerDinoUNet_smoke"} <= set(names)
    assert shim.nnUNetTrainerDinoUNet.__module__ == "nnunet_dino.nnunet.trainers"  # picklable by import path
    sys.modules.pop("shim", None)


def test_env_persist_is_one_reversible_line(tmp_path, monkeypatch):
    import os

    import nnunet_dino.nnunet.environment as environment

    target = tmp_path / environment.PTH_NAME
    monkeypatch.setattr(environment, "persist_file", lambda: target)
    assert main(["env", "--persist"]) == 0
    line = target.read_text()  # a comment naming the command that undoes it, then the one line Python runs
    assert line.count("\n") == 2 and line.startswith("# written by nnunet-dino env --persist")
    assert line.splitlines()[1].startswith("import os;")
    monkeypatch.setenv("nnUNet_extTrainer", "/a")
    exec(line)  # what Python's site module does with the line at start-up
    assert os.environ["nnUNet_extTrainer"] == f"/a{os.pathsep}{trainer_folder()}"
    exec(line)  # idempotent
    assert os.environ["nnUNet_extTrainer"] == f"/a{os.pathsep}{trainer_folder()}"
    assert main(["env", "--unpersist"]) == 0 and not target.exists()


def test_random_weight_trainers_pin_random_real_sized_backbones():
    from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_B_random, nnUNetTrainerDinoUNet_S_random

    for cls, backbone in ((nnUNetTrainerDinoUNet_S_random, "dinov3_vits16"),
                          (nnUNetTrainerDinoUNet_B_random, "dinov3_vitb16")):
        kwargs = cls.dino_arch(STOCK_ARCH)["arch_kwargs"]
        assert (kwargs["backbone"], kwargs["backbone_weights"]) == (backbone, "random")
        assert "ACCURACY MEANINGLESS" in cls.__doc__


def test_plans_encoder_scale_weights_and_the_token_grid_line(stock_dataset, tmp_path, capsys):
    """--encoder-scale and --weights are written into the plans; the printed token grid is the patch's."""
    from nnunet_dino.nnunet.plans import choose_encoder_scale, token_grid

    assert main(["plans", "-d", "Dataset990_X", "--encoder-scale", "1", "--plans-name", "reference"]) == 0
    out = capsys.readouterr().out
    assert "token grid: 8 x 10 per 128 x 160 patch (encoder_scale 1); WARNING: below 16 tokens per side" in out
    assert main(["plans", "-d", "Dataset990_X"]) == 0  # the default: auto, 2 for this patch (the encoder study)
    assert "token grid: 16 x 20 per 128 x 160 patch (encoder_scale 2)" in capsys.readouterr().out
    assert main(["plans", "-d", "Dataset990_X", "--encoder-scale", "auto", "--weights", "random",
                 "--backbone", "dinov2_vits14"]) == 0
    out = capsys.readouterr().out
    plans = json.loads((stock_dataset / "nnUNetPlans_dinov2_vits14_random.json").read_text())
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert kwargs["encoder_scale"] == 2 and kwargs["backbone_weights"] == "random"
    assert "token grid: 16 x 20 per 128 x 160 patch (encoder_scale 2)" in out and "WARNING" not in out
    assert "weights: RANDOM" in out
    assert token_grid([100, 70], 4) == [32, 24] and choose_encoder_scale([512, 512], "auto") == 1
    assert choose_encoder_scale([32, 64], "auto") == 2  # auto stops at 2 (4 was not measured); 4 by name
    assert choose_encoder_scale([32, 64], "4") == 4 and choose_encoder_scale([256, 256]) == 1
    assert main(["plans", "-d", "Dataset990_X", "--encoder-scale", "3", "--plans-name", "x"]) == 2
    assert "--encoder-scale 3 is unknown; valid choices: 1, 2, 4, auto." in capsys.readouterr().err
    assert main(["plans", "-d", "Dataset990_X", "--weights", str(tmp_path / "nope.pth"), "--plans-name", "y"]) == 2
    assert "no such file; pass a weight file for dinov3_vits16 or 'random'" in capsys.readouterr().err
    assert not (stock_dataset / "x.json").exists() and not (stock_dataset / "y.json").exists()


def test_no_weights_found_names_the_random_route():
    from nnunet_dino.backbones import build_backbone

    with pytest.raises(DinoUNetError, match=r"Without it \(architecture and cost only, accuracy meaningless\): "
                                            r"nnunet-dino plans -d DATASET --backbone dinov3_vits16 --weights random"):
        build_backbone("dinov3_vits16")

"""Hostile input: never silently wrong, one-line errors that name the fix (CPU, tiny backbone, random files)."""
import copy
import os
import shutil

import pytest
import torch

from nnunet_dino.backbones import build_backbone, check_weight_file
from nnunet_dino.backbones.hash_cache import cached_sha256, file_sha256
from nnunet_dino.commands.cli import main
from nnunet_dino.errors import DinoUNetError
from nnunet_dino.network import DinoUNet
from nnunet_dino.testing.synthetic import write_meta_checkpoint


def tiny(channels=1, classes=3, **kw):
    return DinoUNet(channels, classes, backbone="dinov3_test_tiny", **kw).eval()


# --- 1. a replaced backbone file is never used silently ------------------------------------------------------------
def test_swapped_file_with_restored_mtime_is_rehashed(tmp_path):
    a = write_meta_checkpoint("dinov3_test_tiny", tmp_path / "a", seed=1, with_hash=False)
    b = write_meta_checkpoint("dinov3_test_tiny", tmp_path / "b", seed=2, with_hash=False)
    assert a.stat().st_size == b.stat().st_size
    sha_a = file_sha256(a)
    st = a.stat()
    shutil.copyfile(b, a)                              # same size, other weights
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))   # touch -r: mtime restored
    assert a.stat().st_mtime_ns == st.st_mtime_ns
    assert cached_sha256(a) is None and file_sha256(a) == file_sha256(b) != sha_a
    # a model trained on the first file refuses the swapped one
    with pytest.raises(DinoUNetError, match="differ from those this model was trained with"):
        check_weight_file("dinov3_test_tiny", a, expected_sha256=sha_a)


def test_in_place_rewrite_keeping_every_stat_field_is_caught_by_the_sample(tmp_path, monkeypatch):
    import nnunet_dino.backbones.hash_cache as hc

    path = write_meta_checkpoint("dinov3_test_tiny", tmp_path, with_hash=False)
    sha = file_sha256(path)
    assert cached_sha256(path) == sha
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    before = hc._identity(path.stat())
    path.write_bytes(bytes(data))
    monkeypatch.setattr(hc, "_identity", lambda _st: before)  # pretend every stat field was restored
    assert cached_sha256(path) is None  # the sampled blocks differ


def test_concurrent_runs_keep_every_entry(tmp_path):
    files = [write_meta_checkpoint("dinov3_test_tiny", tmp_path / str(i), seed=i, with_hash=False) for i in range(3)]
    shas = [file_sha256(f) for f in files]
    assert [cached_sha256(f) for f in files] == shas  # one entry file per weights file: no last-writer-wins


# --- 2. weights --verify ----------------------------------------------------------------------------------------
def test_weights_verify_checks_every_file_and_fails_loudly(tmp_path, capsys):
    good = write_meta_checkpoint("dinov3_vits16", tmp_path)
    (tmp_path / "dinov3_vitb16_pretrain_lvd1689m.pth").write_bytes(b"")                    # empty
    (tmp_path / "dinov3_vitl16_pretrain_lvd1689m.pth").write_bytes(b"garbage" * 100)      # not a checkpoint
    shutil.copyfile(good, tmp_path / "dinov3_vith16plus_pretrain_lvd1689m.pth")           # wrong variant, no hash
    assert main(["weights", "--folder", str(tmp_path), "--verify"]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "verified" in lines["dinov3_vits16"] and good.name in lines["dinov3_vits16"]
    assert "FAILED" in lines["dinov3_vitb16"] and "empty (0 bytes)" in lines["dinov3_vitb16"]
    assert "FAILED" in lines["dinov3_vitl16"] and "not a readable checkpoint" in lines["dinov3_vitl16"]
    assert "FAILED" in lines["dinov3_vith16plus"] and "looks like" in lines["dinov3_vith16plus"]
    for p in tmp_path.glob("dinov3_vit[bhl]*"):
        p.unlink()
    assert main(["weights", "--folder", str(tmp_path), "--verify"]) == 0
    wrong = good.with_name("dinov3_vits16_pretrain_lvd1689m-DEADBEEF.pth")  # upper-case hash is read too
    good.rename(wrong)
    assert main(["weights", "--folder", str(tmp_path), "--verify"]) == 1
    assert "Hash mismatch" in capsys.readouterr().out


# --- 3/4/6. inputs -----------------------------------------------------------------------------------------------
def test_nan_or_inf_input_is_refused():
    x = torch.randn(1, 1, 64, 64)
    x[0, 0, 3, 4] = float("nan")
    with pytest.raises(DinoUNetError, match="1 NaN/Inf value"):
        tiny()(x)
    x[0, 0, 3, 4] = float("inf")
    with pytest.raises(DinoUNetError, match="case named in the lines above"):
        tiny()(x)


def test_wrong_channel_count_is_refused():
    with pytest.raises(DinoUNetError, match="built for 3 input channel\\(s\\) but got 1"):
        tiny(3)(torch.randn(1, 1, 64, 64))
    with pytest.raises(DinoUNetError, match="built for 3 input channel\\(s\\) but got 1"):
        tiny(3, channel_mode="reference")(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int32])
def test_other_dtypes_are_cast(dtype):
    net = tiny()
    x = (torch.rand(1, 1, 64, 64) * 100).to(dtype)
    with torch.no_grad():
        out = net(x)
        assert out.dtype == torch.float32 and torch.allclose(out, net(x.float()), atol=1e-5)


def test_bad_shapes_and_channels():
    with pytest.raises(DinoUNetError, match="add a batch dimension"):
        tiny()(torch.randn(1, 64, 64))
    with pytest.raises(DinoUNetError, match="input_channels must be at least 1"):
        tiny(0)


# --- 5. small images ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (2, 7), (12, 16), (24, 20), (31, 31), (32, 32), (33, 1)])
def test_small_images_train_and_predict(size):
    net = tiny()
    with torch.no_grad():
        assert net(torch.randn(1, 1, *size)).shape == (1, 3, *size)
    net.train()
    loss = net(torch.randn(2, 1, *size)).mean()
    loss.backward()


def test_stock_plans_with_fewer_than_four_stages():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_smoke
    from nnunet_dino.testing.synthetic import STOCK_ARCH, stock_plans

    plans = copy.deepcopy(stock_plans())
    kw = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kw.update(n_stages=3, features_per_stage=[32, 64, 128], kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
              n_conv_per_stage=[2] * 3, n_conv_per_stage_decoder=[2] * 2)
    plans["configurations"]["2d"]["patch_size"] = [12, 16]
    pm = PlansManager(plans)
    net = nnUNetTrainerDinoUNet_smoke.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, False).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 12, 16)).shape == (1, 3, 12, 16)
    assert STOCK_ARCH["arch_kwargs"]["n_stages"] == 5  # the shared fixture was not modified


# --- 7/8. early, correct one-line errors ---------------------------------------------------------------------------
def test_weights_errors_each_say_what_is_wrong(tmp_path, monkeypatch):
    empty = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    empty.write_bytes(b"")
    with pytest.raises(DinoUNetError, match="is empty \\(0 bytes\\)"):
        build_backbone("dinov3_vits16", empty)
    monkeypatch.setenv("nnUNet_dino_weights", str(empty))
    with pytest.raises(DinoUNetError, match="must name the folder .* is a file; export nnUNet_dino_weights="):
        build_backbone("dinov3_vits16")
    monkeypatch.delenv("nnUNet_dino_weights")
    good = write_meta_checkpoint("dinov3_test_tiny", tmp_path / "r", with_hash=False)
    real_open = open

    def unreadable(path, *a, **k):
        if str(path) == str(good):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", unreadable)
    with pytest.raises(DinoUNetError, match="cannot be read \\(Permission denied\\); fix its permissions"):
        check_weight_file("dinov3_test_tiny", good)


def test_trainer_refuses_before_creating_any_folder(tmp_path, monkeypatch):
    from nnunet_dino.nnunet.trainers import nnUNetTrainerDinoUNet
    from nnunet_dino.testing.synthetic import stock_plans

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path / "weights"))
    dataset_json = {"channel_names": {"0": "x"}, "labels": {"background": 0, "a": 1}, "file_ending": ".png"}
    with pytest.raises(DinoUNetError, match="No weights found for backbone dinov3_vits16"):
        nnUNetTrainerDinoUNet(dict(stock_plans(), continue_training=False), "2d", 0, dataset_json,
                              device=torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DinoUNetError, match="add -device cpu"):
            nnUNetTrainerDinoUNet(dict(stock_plans(), continue_training=False), "2d", 0, dataset_json,
                                  device=torch.device("cuda"))
    assert not (tmp_path / "res").exists()


def test_dinounet_error_prints_one_line_under_console_scripts():
    import subprocess
    import sys

    code = ("import nnunet_dino.nnunet.trainers\n"
            "from nnunet_dino.errors import DinoUNetError\n"
            "raise DinoUNetError('put the file there')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == "nnunet-dino: error: put the file there\n"


# --- 13. env --persist ---------------------------------------------------------------------------------------------
def test_unpersist_says_when_nothing_was_there_and_unwritable_is_one_line(tmp_path, monkeypatch, capsys):
    import nnunet_dino.nnunet.environment as environment

    monkeypatch.setattr(environment, "persist_file", lambda: tmp_path / "nope" / environment.PTH_NAME)
    assert main(["env", "--unpersist"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert main(["env", "--persist"]) == 2  # the folder does not exist: not writable
    err = capsys.readouterr().err
    assert "Cannot write" in err and err.count("\n") == 1


def test_weights_verify_model_folder(tmp_path, monkeypatch, capsys):
    import json

    path = write_meta_checkpoint("dinov3_test_tiny", tmp_path / "w", with_hash=False)
    monkeypatch.setenv("nnUNet_dino_weights", str(tmp_path / "w"))
    model = tmp_path / "Dataset1_X" / "T__nnUNetPlans__2d"
    model.mkdir(parents=True)

    def plans(sha):
        block = {"network_class_name": "nnunet_dino.network.DinoUNet",
                 "arch_kwargs": {"backbone": "dinov3_test_tiny", "backbone_weights": path.name,
                                 "backbone_weights_sha256": sha}}
        (model / "plans.json").write_text(json.dumps({"configurations": {"2d": {"architecture": block}}}))

    plans(file_sha256(path))
    assert main(["weights", "--model", str(model)]) == 0
    assert "verified" in capsys.readouterr().out.splitlines()[-1]
    plans("0" * 64)
    assert main(["weights", "--model", str(model)]) == 1
    assert "differ from those this model was trained with" in capsys.readouterr().out
    assert main(["weights", "--model", str(tmp_path)]) == 2  # not a model folder: one-line error


def test_a_torch_torchvision_pair_that_does_not_belong_together_is_one_line_before_any_work(monkeypatch, capsys):
    import importlib.metadata as metadata

    import nnunet_dino.nnunet.environment as environment
    from nnunet_dino.commands.cli import main

    environment.check_torch_pair()  # this environment's pair works
    versions = {"torch": "2.13.0+cpu", "torchvision": "0.28.0"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])

    def broken(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    with pytest.raises(DinoUNetError, match=r"torchvision 0.28.0 does not work with torch 2.13.0\+cpu here \(operator "
                                            r"torchvision::nms does not exist\); install the pair built together, "
                                            r"from one source: pip install 'torch==2.13.0' 'torchvision==0.28.\*'"):
        environment.check_torch_pair(broken)
    versions["torchvision"] = "0.24.1"  # imports, but belongs to torch 2.9
    with pytest.raises(DinoUNetError, match=r"\(another release\)"):
        environment.check_torch_pair(lambda name: None)
    original = environment.check_torch_pair
    monkeypatch.setattr(environment, "check_torch_pair", lambda: original(broken))
    assert main(["env"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'torch==2.13.0' 'torchvision==0.28.*'" in err

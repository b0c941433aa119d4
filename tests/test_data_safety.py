"""Nothing lost, nothing run: every command that writes follows the output rule (nnunet_dino/files.py), handed files
are checked before nnU-Net imports or unpickles them, and bad inputs end in one line."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nnunet_dino.commands.cli import main
from nnunet_dino.errors import DinoUNetError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- 1, 11, 12, 14: export ------------------------------------------------------------------------------------------
def export(model: Path, out: Path, *extra: str) -> int:
    return main(["export", "-m", str(model), "--format", "torchscript", "--size", "64", "64", "-o", str(out), *extra])


@pytest.mark.parametrize("target", ["results", "parent", "thesis_folder", "cwd", "file"])
def test_export_never_touches_a_folder_it_did_not_write(dino_model, tmp_path, monkeypatch, capsys, target):
    model = dino_model()
    thesis = tmp_path / "work" / "thesis.txt"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    out = {"results": model.parent, "parent": tmp_path, "thesis_folder": thesis.parent, "cwd": Path("."),
           "file": thesis}[target]
    monkeypatch.chdir(thesis.parent)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert export(model, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--force" in err or "is a file" in err)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert thesis.read_text() == "years of work"


def test_export_replaces_only_its_own_files_with_the_users_permissions(dino_model, tmp_path, umask_022, capsys):
    model = dino_model()
    out = tmp_path / "exported"
    users = tmp_path / "exported.partial"  # the user's own folder of that name
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    assert export(model, out) == 0
    assert "wrote " in capsys.readouterr().out
    assert (users / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [".nnunet-dino-output.json", "fold_0.pt", "preprocessing.json"]
    assert mode(out) == 0o755 and all(mode(p) == 0o644 for p in out.iterdir())
    (out / "notes.md").write_text("the user's notes")  # added later by the user: kept by a re-export
    assert export(model, out) == 0
    assert (out / "notes.md").read_text() == "the user's notes" and (out / "fold_0.pt").is_file()
    assert not [p for p in out.iterdir() if "partial" in p.name]
    # --force writes into a folder that holds someone else's files, replacing only same-name entries
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    assert export(model, other) == 2
    assert export(model, other, "--force") == 0
    assert (other / "readme.txt").read_text() == "x" and (other / "fold_0.pt").is_file()


def test_export_on_a_full_disk_says_so_and_leaves_nothing(dino_model, tmp_path, monkeypatch, capsys):
    import nnunet_dino.commands.export as export_module
    import nnunet_dino.files as files

    model = dino_model()
    out = tmp_path / "exported"
    real = files.shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert export(model, out) == 2
    err = capsys.readouterr().err
    assert f"No space left on the device of {out}" in err and "MB free" in err and err.count("\n") == 1
    assert not out.exists()
    monkeypatch.setattr(files.shutil, "disk_usage", real)

    def disk_full(module, example, target):
        Path(target).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "_export_torchscript", disk_full)
    assert export(model, out) == 2
    assert f"No space left on the device of {out}" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*partial*"))


def test_export_refuses_duplicate_folds(dino_model, tmp_path, capsys):
    assert export(dino_model(), tmp_path / "out", "-f", "0", "0") == 2
    assert "names a fold twice" in capsys.readouterr().err


# --- 6: no code runs from a handed model folder ----------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["nnUNetTrainer_demo", "nnUNetTrainerDinoUNet_smoke"])
def test_export_checks_every_import_in_the_plans_before_building(dino_model, tmp_path, capsys, trainer):
    model = dino_model(trainer)
    marker = tmp_path / "pwned"
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]
    if trainer == "nnUNetTrainer_demo":
        arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["arch_kwargs"]["nonlin"] = "subprocess.call"
    arch["arch_kwargs"]["nonlin_kwargs"] = {"args": f"touch {marker}", "shell": True}
    (model / "plans.json").write_text(json.dumps(plans))
    assert export(model, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "'subprocess.call' as nonlin" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_refuses_a_stock_model_in_one_line_before_building(dino_model, tmp_path, capsys):
    model = dino_model("nnUNetTrainer_demo")
    assert export(model, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "not a Dino U-Net trainer" in err and err.count("\n") == 1


# --- 2: demo --clean ------------------------------------------------------------------------------------------------
def test_demo_clean_deletes_only_a_folder_the_demo_created(tmp_path, capsys):
    from nnunet_dino.commands.demo import DEMO_MARKER, claim_demo_folder

    users = tmp_path / "project"
    users.mkdir()
    (users / "data.csv").write_text("1,2")
    assert main(["demo", "--clean", "--folder", str(users)]) == 2
    assert "--clean deletes only a folder the demo created" in capsys.readouterr().err
    assert main(["demo", "--folder", str(users)]) == 2
    assert "add --force" in capsys.readouterr().err
    assert (users / "data.csv").read_text() == "1,2"
    demo = claim_demo_folder(tmp_path / "demo", clean=False, force=False)
    assert (demo / DEMO_MARKER).is_file()
    (demo / "raw").mkdir()
    assert claim_demo_folder(demo, clean=True, force=False) == demo and not (demo / "raw").exists()
    assert (demo / DEMO_MARKER).is_file()


# --- 3: plans names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [
    ("dataset", "would overwrite nnU-Net's dataset.json"),
    ("splits_final", "would overwrite nnU-Net's splits_final.json"),
    ("dataset_fingerprint", "would overwrite"),
    ("nnUNetPlans", "would overwrite"),
    ("../../x", "must be a plain name"),
    ("/abs", "must be a plain name"),
    ("x.json", "must be a plain name"),
])
def test_plans_names_are_validated(stock_dataset, capsys, name, message):
    before = {p.name: p.read_bytes() for p in stock_dataset.iterdir()}
    assert main(["plans", "-d", "990", "--plans-name", name]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in stock_dataset.iterdir()} == before


def test_existing_plans_file_is_replaced_only_with_force(stock_dataset, capsys, umask_022):
    assert main(["plans", "-d", "990", "--plans-name", "mine"]) == 0
    assert mode(stock_dataset / "mine.json") == 0o644
    assert main(["plans", "-d", "990", "--plans-name", "mine"]) == 0  # the same plans again: nothing lost
    assert main(["plans", "-d", "990", "--plans-name", "mine", "--preset", "dinounet_b"]) == 2
    assert "exists with other content; add --force" in capsys.readouterr().err
    assert json.loads((stock_dataset / "mine.json").read_text())["configurations"]["2d"]["architecture"][
        "arch_kwargs"]["backbone"] == "dinov3_vits16"
    assert main(["plans", "-d", "990", "--plans-name", "mine", "--preset", "dinounet_b", "--force"]) == 0
    assert json.loads((stock_dataset / "mine.json").read_text())["configurations"]["2d"]["architecture"][
        "arch_kwargs"]["backbone"] == "dinov3_vitb16"


# --- 4, 13: features ------------------------------------------------------------------------------------------------
def features(image: Path, out: Path, *extra: str) -> int:
    return main(["features", str(image), "--backbone", "dinov3_test_tiny", "--size", "64", "-o", str(out), *extra])


def test_features_never_replaces_the_input_and_writes_into_a_folder(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "slice.png"
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)).save(image)
    original = image.read_bytes()
    assert features(image, image) == 2
    assert image.read_bytes() == original
    assert features(image, image, "--force") == 2  # never the input, not even with --force
    capsys.readouterr()
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert features(image, folder) == 0
    written = folder / "slice_features.png"
    assert capsys.readouterr().out.strip() == f"wrote {written}" and written.stat().st_size > 1000
    assert features(image, written) == 0  # its own earlier output is replaced
    other = tmp_path / "holiday.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other)
    assert features(image, other) == 2 and "was not written by nnunet-dino features" in capsys.readouterr().err
    assert features(image, tmp_path / "picture.jpg") == 2


def test_features_reads_a_2d_nifti_and_refuses_nan(tmp_path, capsys):
    import nibabel as nib

    flat = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(flat, np.eye(4)), str(tmp_path / "flat.nii.gz"))
    assert features(tmp_path / "flat.nii.gz", tmp_path / "flat.png") == 0
    flat[3, 3] = np.nan
    nib.save(nib.Nifti1Image(flat[..., None], np.eye(4)), str(tmp_path / "nan.nii.gz"))
    capsys.readouterr()
    assert features(tmp_path / "nan.nii.gz", tmp_path / "nan.png") == 2
    err = capsys.readouterr().err
    assert "NaN or infinite values" in err and err.count("\n") == 1


# --- 5, 7, 9, 10, 11, 12: benchmark ---------------------------------------------------------------------------------
def bench(root: Path, out: Path, *extra: str) -> int:
    return main(["benchmark", "-d", "321", "--trainers", "base", "other", "--folds", "0", "1", "-o", str(out), *extra])


def test_benchmark_keeps_a_users_report_and_reuses_its_own_folder(fake_env, capsys):
    root = fake_env({"base": 0, "other": 1})
    out = root / "notes"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    assert bench(root, out) == 2
    assert "holds no earlier output of benchmark" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "my own report"
    fresh = root / "bench"
    assert bench(root, fresh) == 0 and bench(root, fresh) == 0  # its own output is replaced
    assert (fresh / "report.md").read_text().startswith("# Benchmark")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_benchmark_checks_checkpoints_and_plans_before_nnunet_loads_them(fake_env, capsys):
    root = fake_env({"base": 0, "other": 1})
    model = root / "res" / "Dataset321_Fake" / "other__nnUNetPlans__2d"
    marker = root / "pwned"
    torch.save({"network_weights": {}, "init_args": _Payload(marker)}, model / "fold_1" / "checkpoint_final.pth")
    test = [str(root / "raw" / "Dataset321_Fake" / "imagesTr"),
            str(root / "pre" / "Dataset321_Fake" / "gt_segmentations")]
    assert bench(root, root / "out", "--test", *test) == 2
    assert "Refusing to load" in capsys.readouterr().err and not marker.exists() and not (root / "out").exists()
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"] = {"2d": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"nonlin": "os.system"}, "_kw_requires_import": ["nonlin"]}}}
    (model / "plans.json").write_text(json.dumps(plans))
    assert bench(root, root / "out") == 2
    assert "'os.system' as nonlin" in capsys.readouterr().err and not (root / "out").exists()


def test_benchmark_refuses_a_reference_label_dataset_json_does_not_list(fake_env, capsys):
    import SimpleITK as sitk

    root = fake_env({"base": 0, "other": 1})
    ref = root / "pre" / "Dataset321_Fake" / "gt_segmentations" / "c00.nii.gz"
    image = sitk.ReadImage(str(ref))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 7
    fixed = sitk.GetImageFromArray(array)
    fixed.CopyInformation(image)
    sitk.WriteImage(fixed, str(ref))
    assert bench(root, root / "out") == 2
    err = capsys.readouterr().err
    assert "(case c00) holds label value 7, which dataset.json does not list (valid: [0, 1, 2])" in err


@pytest.mark.parametrize("extra, message", [
    (["--tolerance-mm", "-1"], "--tolerance-mm must be a positive number"),
    (["--tolerance-mm", "nan"], "--tolerance-mm must be a positive number"),
    (["--tolerance-mm-per-class", "organ=abc"], "--tolerance-mm-per-class organ must be a positive number"),
    (["--folds", "0", "0"], "names a fold twice"),
])
def test_benchmark_refuses_bad_numbers_in_one_line(fake_env, capsys, extra, message):
    root = fake_env({"base": 0, "other": 1})
    assert bench(root, root / "out", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (root / "out").exists()


def test_benchmark_on_a_full_disk_leaves_no_partial_report(fake_env, monkeypatch, capsys):
    root = fake_env({"base": 0, "other": 1})
    out = root / "bench"
    assert bench(root, out) == 0
    report = (out / "report.md").read_text()
    real = pd.DataFrame.to_csv

    def disk_full(self, path, *a, **k):
        real(self, path, *a, **k)
        if Path(path).name == "costs.csv":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    assert bench(root, out, "--tolerance-mm", "3") == 2
    err = capsys.readouterr().err
    assert f"No space left on the device of {out}" in err and err.count("\n") == 1
    assert (out / "report.md").read_text() == report and not [p for p in out.iterdir() if "partial" in p.name]
    assert bench(root, root / "new", "--tolerance-mm", "3") == 2 and not (root / "new").exists()


# --- 8, 13: the ONNX example ----------------------------------------------------------------------------------------
@pytest.fixture
def onnx_example():
    spec = importlib.util.spec_from_file_location("onnx_predict", EXAMPLES / "onnx_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["../x/fold_0.onnx", "/etc/passwd", "sub/fold_0.onnx"])
def test_onnx_example_reads_only_files_inside_the_export(onnx_example, tmp_path, name):
    pytest.importorskip("onnxruntime")
    exported = tmp_path / "exported"
    (exported / "sub").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "fold_0.onnx").write_bytes(b"")
    (exported / "sub" / "fold_0.onnx").write_bytes(b"")
    (exported / "preprocessing.json").write_text(json.dumps({"networks": [name]}))
    with pytest.raises(SystemExit, match="not a file in"):
        onnx_example.load(exported)


def test_onnx_example_names_the_channels_the_model_expects(onnx_example, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb_0000.png")
    with pytest.raises(SystemExit, match="holds 3 channels but the model expects 1"):
        onnx_example.read_case(tmp_path / "rgb_0000.png", 1)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey_0000.png")
    with pytest.raises(SystemExit, match="expects 2 channel.* grey_0001.png does not exist"):
        onnx_example.read_case(tmp_path / "grey_0000.png", 2)
    assert onnx_example.read_case(tmp_path / "grey_0000.png", 1)[0].shape == (1, 1, 8, 8)


# --- 13: weights folder and Hugging Face config ---------------------------------------------------------------------
def test_weights_folder_that_is_a_file_and_a_broken_config_are_one_line(tmp_path, capsys):
    from nnunet_dino.backbones import hf_config_entry

    (tmp_path / "w.pth").write_bytes(b"x")
    assert main(["weights", "--folder", str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err
    assert f"is a file; pass the folder that holds it: --folder {tmp_path}" in err
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DinoUNetError, match="config.json is not readable JSON"):
        hf_config_entry(tmp_path)


def test_atomic_json_has_the_users_permissions(tmp_path, umask_022):
    from nnunet_dino.files import atomic_write_json

    atomic_write_json({"a": 1}, tmp_path / "x.json")
    assert mode(tmp_path / "x.json") == 0o644 and json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]

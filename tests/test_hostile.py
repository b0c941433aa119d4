"""The third hostile round (issue 26): names in plans that would run code, files the commands must not touch."""
import json

import pytest

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.nnunet.allowlist import check_op_name, check_plans_imports, resolve_module_class


def plans_with(network: str, **kwargs) -> dict:
    arch = {"network_class_name": network, "arch_kwargs": kwargs, "_kw_requires_import": []}
    return {"configurations": {"2d": {"architecture": arch}}}


HUB = "dynamic_network_architectures.architectures.unet.torch.hub.load"


@pytest.mark.parametrize("network", [
    HUB,                                                                        # a path through a module's import
    "dynamic_network_architectures.architectures.unet.convert_conv_op_to_dim",  # a module-level function
    "nnunet_dino.network.dino_unet.nn.Conv2d",                                  # torch re-exported through ours
    "nnunet_dino.network.dino_unet.F.interpolate",
    "dynamic_network_architectures.architectures.unet.nn.Module",
    "nnunet_dino..network.DinoUNet",                                            # extra dots
    "nnunet_dino.network.DinoUNet.",
    "nnunet_dino.network.DinoUNet.__init__",
    "nnunet_dino.network.DinoUNet.__class__",                                   # `type`, not a network
    "nnunet_dino",
    "os.system",
    "nnunet_dinox.network.DinoUNet",                                            # a look-alike package name
])
def test_network_names_that_are_not_network_classes_of_the_allowed_packages_are_refused(network):
    with pytest.raises(DinoUNetError, match="only network classes of dynamic_network_architectures"):
        check_plans_imports(plans_with(network), "plans.json")


def test_the_hub_bypass_is_refused_before_anything_runs(tmp_path):
    """The reported bypass: torch.hub.load of a local folder whose hubconf.py would run; refused, nothing ran."""
    (tmp_path / "hubconf.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\ndef x(**kw): pass\n")
    plans = plans_with(HUB, repo_or_dir=str(tmp_path), model="x", source="local", trust_repo=True)
    with pytest.raises(DinoUNetError):
        check_plans_imports(plans, "plans.json")
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize("network", [
    "nnunet_dino.network.DinoUNet",                                   # the re-export our plans have always named
    "nnunet_dino.network.dino_unet.DinoUNet",
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
])
def test_real_network_classes_pass(network):
    check_plans_imports(plans_with(network, nonlin="torch.nn.LeakyReLU", norm_op="torch.nn.InstanceNorm2d"))


@pytest.mark.parametrize("value", [
    "torch.nn.modules.module.Module",      # the base class is no op
    "torch.nn..ReLU",
    "torch.nn.ReLU.",
    "torch.nn.functional.relu",
    "torch.nn.modules.conv.F.conv2d",      # a function reached through a module's import
    "torch.nn.modules.activation.Tensor",  # not a module class
    "subprocess.call",
    "torch.nnx.ReLU",
])
def test_op_names_that_are_not_torch_nn_module_classes_are_refused(value):
    with pytest.raises(DinoUNetError, match="only torch.nn module classes"):
        check_op_name("nonlin", value)


@pytest.mark.parametrize("value", ["torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU",
                                   "torch.nn.InstanceNorm2d", "torch.nn.Dropout2d", "torch.nn.Conv2d"])
def test_torch_nn_module_classes_pass(value):
    assert resolve_module_class(value, ("torch.nn",)) is not None
    check_op_name("nonlin", value)


def test_every_name_nnunet_would_import_is_checked():
    """A key listed in _kw_requires_import that is not an op is checked too (nnU-Net imports every listed key)."""
    plans = plans_with("nnunet_dino.network.DinoUNet", backbone="os.system")
    plans["configurations"]["2d"]["architecture"]["_kw_requires_import"] = ["backbone"]
    with pytest.raises(DinoUNetError, match="'os.system' as backbone"):
        check_plans_imports(plans)
    plans["configurations"]["2d"]["architecture"]["_kw_requires_import"] = "backbone"
    with pytest.raises(DinoUNetError, match="malformed"):
        check_plans_imports(json.loads(json.dumps(plans)))


# --- env: --persist/--unpersist touch only their own file; the printed line is quoted ---------------------------
@pytest.fixture
def pth(tmp_path, monkeypatch):
    import nnunet_dino.nnunet.environment as environment

    target = tmp_path / environment.PTH_NAME
    monkeypatch.setattr(environment, "persist_file", lambda: target)
    return target


def test_persist_never_writes_through_a_link_or_over_a_users_file(pth, tmp_path, capsys):
    from nnunet_dino.commands.cli import main

    users = tmp_path / "users_file.txt"
    users.write_text("mine")
    pth.symlink_to(users)
    assert main(["env", "--persist"]) == 2
    err = capsys.readouterr().err
    assert str(pth) in err and "was not written by nnunet-dino env --persist" in err and err.count("\n") == 1
    assert users.read_text() == "mine" and pth.is_symlink()
    assert main(["env", "--unpersist"]) == 2  # nor removes the link
    assert pth.is_symlink() and users.read_text() == "mine"
    pth.unlink()
    pth.write_text("import something_of_the_users\n")
    assert main(["env", "--persist"]) == 2 and main(["env", "--unpersist"]) == 2
    assert pth.read_text() == "import something_of_the_users\n"


def test_persist_replaces_and_removes_its_own_file(pth):
    from nnunet_dino.commands.cli import main

    assert main(["env", "--persist"]) == 0 and main(["env", "--persist"]) == 0  # its own file: rewritten
    assert main(["env", "--unpersist"]) == 0 and not pth.exists()


@pytest.mark.parametrize("value", ["/my folder/trainers", "$(touch INJECTED)", "`touch INJECTED`", "a;touch INJECTED",
                                   "it's", "/données/entraîneurs"])
def test_env_line_keeps_any_existing_value_intact_through_eval(value, tmp_path, monkeypatch, capsys):
    import subprocess

    from nnunet_dino.commands.cli import main
    from nnunet_dino.nnunet.environment import trainer_folder

    monkeypatch.setenv("nnUNet_extTrainer", value)
    assert main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    got = subprocess.run(["bash", "-c", 'eval "$1"; printf %s "$nnUNet_extTrainer"', "_", line], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert got == f"{value}:{trainer_folder()}"
    assert not (tmp_path / "INJECTED").exists()


# --- the output rule: a manifest is a record of what we wrote, not an order to delete ----------------------------
def _write(folder, files: dict, keep=()):
    def build(stage):
        for name, text in files.items():
            (stage / name).write_text(text)
    folder.write(build, keep=keep)


def test_a_rerun_removes_only_the_files_it_wrote_from_a_folder_it_kept(tmp_path):
    """benchmark --test, then a rerun without --test: nnU-Net's predictions go, the user's file in that folder stays."""
    from nnunet_dino.files import OutputFolder

    out = tmp_path / "bench"
    folder = OutputFolder(out, "benchmark")
    folder.claim("test_predictions")
    (out / "test_predictions" / "modelA").mkdir(parents=True)  # what nnUNetv2_predict writes after the claim
    (out / "test_predictions" / "modelA" / "case1.nii.gz").write_bytes(b"prediction")
    _write(folder, {"report.md": "r1"}, keep=("test_predictions",))
    (out / "test_predictions" / "my_notes.txt").write_text("mine")  # the user adds a file there
    _write(OutputFolder(out, "benchmark"), {"report.md": "r2"})     # a rerun without --test
    assert (out / "test_predictions" / "my_notes.txt").read_text() == "mine"
    assert not (out / "test_predictions" / "modelA").exists() and (out / "report.md").read_text() == "r2"


def test_a_manifest_naming_a_users_files_deletes_nothing(tmp_path):
    import json

    from nnunet_dino.files import MANIFEST, OutputFolder

    out = tmp_path / "bench"
    _write(OutputFolder(out, "benchmark"), {"report.md": "r1"})
    (out / "notes.txt").write_text("mine")
    (out / "mydata").mkdir()
    (out / "mydata" / "a.txt").write_text("data")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] += ["notes.txt", "mydata"]  # listed by hand, or by a copied folder
    manifest["entries"]["notes.txt"] = {"size": 4, "sha256": "0" * 64}
    manifest["entries"]["mydata"] = {"files": {"a.txt": {"size": 4, "sha256": "0" * 64}}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    _write(OutputFolder(out, "benchmark"), {"report.md": "r2"})
    assert (out / "notes.txt").read_text() == "mine" and (out / "mydata" / "a.txt").read_text() == "data"


def test_a_file_changed_since_we_wrote_it_is_not_replaced_without_force(tmp_path):
    from nnunet_dino.errors import DinoUNetError
    from nnunet_dino.files import OutputFolder

    out = tmp_path / "exported"
    _write(OutputFolder(out, "export"), {"preprocessing.json": "ours"})
    (out / "preprocessing.json").write_text("edited by the user")
    with pytest.raises(DinoUNetError, match="preprocessing.json was changed or written by someone else"):
        _write(OutputFolder(out, "export"), {"preprocessing.json": "new"})
    assert (out / "preprocessing.json").read_text() == "edited by the user"
    _write(OutputFolder(out, "export", force=True), {"preprocessing.json": "new"})
    assert (out / "preprocessing.json").read_text() == "new"


def test_an_existing_private_folder_keeps_its_mode(tmp_path):
    import os

    from nnunet_dino.files import OutputFolder

    for force, setup in ((False, lambda d: None), (True, lambda d: (d / "x.txt").write_text("x"))):
        private = tmp_path / f"private_{force}"
        private.mkdir(mode=0o700)
        os.chmod(private, 0o700)
        setup(private)
        _write(OutputFolder(private, "export", force=force), {"fold_0.onnx": "model"})
        assert (private.stat().st_mode & 0o777) == 0o700


def test_debris_of_a_killed_first_write_is_ours_to_clean(tmp_path):
    """kill -9 while the first write was staging: only our marked staging folder is there; the rerun proceeds."""
    from nnunet_dino.files import STAGE_MARKER, OutputFolder

    out = tmp_path / "exported"
    debris = out / ".partial-abc123"
    debris.mkdir(parents=True)
    (debris / STAGE_MARKER).touch()
    (debris / "fold_0.onnx").write_text("half")
    _write(OutputFolder(out, "export"), {"fold_0.onnx": "model"})
    assert sorted(p.name for p in out.iterdir()) == [".nnunet-dino-output.json", "fold_0.onnx"]
    users = tmp_path / "users"
    (users / ".partial-mine").mkdir(parents=True)  # the user's own folder of that name: not ours, refused
    from nnunet_dino.errors import DinoUNetError

    with pytest.raises(DinoUNetError, match="holds no earlier output of export"):
        OutputFolder(users, "export")
    assert (users / ".partial-mine").is_dir()


# --- the learning curve: no fold scored as something it is not -----------------------------------------------------
def _curve_tree(fake_env):
    import shutil

    from nnunet_dino.evaluation.benchmark import find_dataset
    from nnunet_dino.evaluation.label_efficiency import plan_curve

    root = fake_env({"base": 0, "worse": 2}, n_cases=12)
    plan = plan_curve(find_dataset("321"), [0], [2], repeats=1, seed=0)
    plan.write()
    res = root / "res" / "Dataset321_Fake"
    for trainer in ("base", "worse"):
        shutil.copytree(res / f"{trainer}__nnUNetPlans__2d" / "fold_0", res / f"{trainer}__nnUNetPlans__2d" / "fold_2")
    return root, res, root / "pre" / "Dataset321_Fake"


def _bench(root, *extra):
    from nnunet_dino.commands.cli import main

    return main(["benchmark", "-d", "321", "--trainers", "base", "worse", "--folds", "0", "--labelled", "2",
                 "--repeats", "1", "-o", str(root / "out"), *extra])


def test_a_subset_fold_trained_on_other_cases_is_refused(fake_env, capsys):
    """An old fold_2 (trained on fold 0's 6 cases) is not scored as N = 2: by costs.json's cases, or by the log."""
    root, res, pre = _curve_tree(fake_env)
    splits = json.loads((pre / "splits_final.json").read_text())
    costs = res / "base__nnUNetPlans__2d" / "fold_2" / "costs.json"
    costs.write_text(json.dumps(json.loads(costs.read_text()) | {"training_cases": splits[0]["train"]}))
    assert _bench(root) == 2
    err = capsys.readouterr().err
    assert "base fold 2 was trained on 6 cases, not the 2 that splits_final.json lists" in err
    assert "rerun with --train-missing" in err and err.count("\n") == 1
    costs.write_text(json.dumps(json.loads(costs.read_text()) | {"training_cases": splits[2]["train"]}))
    (res / "worse__nnUNetPlans__2d" / "fold_2" / "training_log_2026_1_1_00_00_00.txt").write_text(
        "2026-01-01 00:00:00: This split has 6 training and 6 validation cases.\n")  # a stock trainer's log
    assert _bench(root) == 2
    assert "worse fold 2 was trained on 6 cases" in capsys.readouterr().err
    (res / "worse__nnUNetPlans__2d" / "fold_2" / "training_log_2026_1_2_00_00_00.txt").write_text(
        "2026-01-02 00:00:00: This split has 2 training and 6 validation cases.\n")  # retrained: the last run counts
    assert _bench(root) == 0


def test_n_comes_from_the_splits_file_and_the_sidecar_is_a_cross_check(fake_env, capsys):
    from nnunet_dino.evaluation.label_efficiency import SIDECAR

    root, res, pre = _curve_tree(fake_env)
    sidecar = json.loads((pre / SIDECAR).read_text())
    sidecar["subsets"][0]["n_labelled"] = 20
    (pre / SIDECAR).write_text(json.dumps(sidecar))
    assert _bench(root) == 2
    err = capsys.readouterr().err
    assert "says fold 2 has 20 labelled cases but splits_final.json lists 2" in err and err.count("\n") == 1


def test_a_second_labelled_run_at_the_same_time_is_refused_naming_the_first(fake_env, capsys):
    import os

    from nnunet_dino.evaluation.label_efficiency import SplitsLock

    root, res, pre = _curve_tree(fake_env)
    before = (pre / "splits_final.json").read_text()
    with SplitsLock(pre):
        assert _bench(root, "--labelled", "2", "3") == 2
    err = capsys.readouterr().err
    assert f"Another nnunet-dino benchmark --labelled (PID {os.getpid()})" in err and err.count("\n") == 1
    assert (pre / "splits_final.json").read_text() == before
    assert _bench(root) == 0  # released


def test_a_refused_run_appends_nothing_and_a_linked_splits_file_is_refused(fake_env, capsys):
    from nnunet_dino.evaluation.label_efficiency import SIDECAR

    root, res, pre = _curve_tree(fake_env)
    splits_file = pre / "splits_final.json"
    before, sidecar = splits_file.read_text(), (pre / SIDECAR).read_text()
    assert _bench(root, "--repeats", "1000") == 2  # nothing trained for them, no --train-missing
    assert "add --train-missing" in capsys.readouterr().err
    assert splits_file.read_text() == before and (pre / SIDECAR).read_text() == sidecar
    real = root / "elsewhere_splits.json"
    real.write_text(before)
    splits_file.unlink()
    splits_file.symlink_to(real)
    assert _bench(root, "--labelled", "3", "--train-missing") == 2
    assert "is a link" in capsys.readouterr().err
    assert splits_file.is_symlink() and real.read_text() == before


@pytest.mark.parametrize("which", ["sidecar", "splits"])
def test_unreadable_splits_or_sidecar_is_one_line(fake_env, capsys, which):
    from nnunet_dino.evaluation.label_efficiency import SIDECAR

    root, res, pre = _curve_tree(fake_env)
    (pre / (SIDECAR if which == "sidecar" else "splits_final.json")).write_text("{not json")
    assert _bench(root) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("restore it" in err)


# --- printed commands: every argument reaches the program as it is ---------------------------------------------------
@pytest.mark.parametrize("name", ["Dataset990_a b", "Dataset991_$(touch INJECTED)", "Dataset992_`touch INJECTED`",
                                  "Dataset993_x;touch INJECTED", "Dataset994_it's", "Dataset995_données"])
def test_every_line_plans_prints_runs_with_its_arguments_intact(name, tmp_path, monkeypatch, capsys):
    """Each printed line, run by bash with the programs replaced by stubs that record their arguments: the dataset
    name, plans name and paths arrive as single arguments and nothing is run from them."""
    import subprocess
    import sys

    from nnunet_dino.commands.cli import main
    from nnunet_dino.testing.synthetic import stock_plans

    pre = tmp_path / "pre" / name
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    bin_dir = tmp_path / "stub bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    for program in ("nnUNetv2_train", "nnUNetv2_predict", "nnunet-dino"):
        stub = bin_dir / program
        stub.write_text(f'#!/bin/bash\nprintf "%s\\0" "$(basename "$0")" "$@" >> {json.dumps(str(record))}\n')
        stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert main(["plans", "-d", name, "--weights", "random"]) == 0
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
             if line.split(":", 1)[0] in ("check", "train", "predict", "compare", "export")}
    assert len(lines) == 5
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "nnUNet_results": str(tmp_path / "my results")}
    for label, line in lines.items():
        record.unlink(missing_ok=True)
        subprocess.run(["bash", "-c", line], cwd=work, env=env, check=True)
        argv = record.read_bytes().decode().split("\0")[:-1]
        assert name in argv or any(a.endswith(f"/{name}/nnUNetTrainerDinoUNet__nnUNetPlans_dinounet_s_random__2d")
                                   for a in argv), (label, argv)
        assert "nnUNetPlans_dinounet_s_random" in " ".join(argv)
    assert not list(work.iterdir()) and not (tmp_path / "INJECTED").exists()
    export = record.read_bytes().decode().split("\0")
    assert str(tmp_path / "my results" / name / "nnUNetTrainerDinoUNet__nnUNetPlans_dinounet_s_random__2d") in export


# --- one line, not a traceback ----------------------------------------------------------------------------------------
def _huge_png(path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))  # 69 bytes, 400 M pixels
    return path


@pytest.fixture
def example():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "onnx_predict", Path(__file__).resolve().parents[1] / "examples" / "onnx_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind, message", [("empty", "is empty (0 bytes)"), ("folder", "is not a regular file"),
                                           ("loop", "cannot be read"), ("huge", "20000 x 20000 pixels"),
                                           ("garbage", "is not a readable image")])
def test_the_onnx_example_refuses_unreadable_inputs_in_one_line(example, tmp_path, kind, message):
    image = tmp_path / "case_0000.png"
    if kind == "empty":
        image.touch()
    elif kind == "folder":
        image.mkdir()
    elif kind == "loop":
        image.symlink_to(image)
    elif kind == "huge":
        _huge_png(image)
    else:
        image.write_bytes(b"not a png at all")
    with pytest.raises(SystemExit) as exit_:
        example.read_case(image, 1)
    text = str(exit_.value)
    assert text.startswith("onnx_predict.py: error:") and message in text and "\n" not in text


def test_features_refuses_a_huge_image_from_its_header(tmp_path, capsys):
    from nnunet_dino.commands.cli import main

    assert main(["features", str(_huge_png(tmp_path / "big.png")), "--backbone", "dinov3_test_tiny",
                 "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert "20000 x 20000 pixels" in err and "crop or downsample" in err and err.count("\n") == 1


def test_weights_folder_with_a_link_loop_a_fifo_and_a_device_is_listed_without_a_hang(tmp_path, monkeypatch, capsys):
    import os

    from nnunet_dino.commands.cli import main

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth").symlink_to("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth")
    os.mkfifo(folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    (folder / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth").symlink_to("/dev/zero")
    monkeypatch.setenv("nnUNet_dino_weights", str(folder))
    assert main(["weights", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("not a regular file (a link loop, a FIFO or a device)") == 3 and "rename it to" not in out


@pytest.mark.parametrize("content, message", [("", "EmptyDataError"), ("a,b\n1,2\n", "no column"),
                                              ("split,fold,case,trainer,class,dice,nsd\n", "no rows")])
def test_a_malformed_cases_csv_is_one_line(tmp_path, capsys, content, message):
    from nnunet_dino.commands.cli import main

    (tmp_path / "cases.csv").write_text(content)
    assert main(["benchmark", "--from-cases", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_manifest_with_a_nul_or_a_non_list_names_nothing(tmp_path):
    from nnunet_dino.files import MANIFEST, OutputFolder

    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for entries in ({"keep.txt\0x": {"size": 4}}, ["keep.txt"], "keep.txt"):
        (out / MANIFEST).write_text(json.dumps({"written_by": "benchmark", "files": entries, "entries": entries}))
        folder = OutputFolder(out, "benchmark")
        assert folder.previous == []
        _write(folder, {"report.md": "r"})
        assert (out / "keep.txt").read_text() == "mine"
        (out / "report.md").unlink()


@pytest.mark.parametrize("damage, message", [("no_trainer", "names no trainer_name"),
                                             ("shape", "does not fit the network")])
def test_export_of_a_damaged_checkpoint_is_one_line(dino_model, tmp_path, capsys, damage, message):
    import torch

    from nnunet_dino.commands.cli import main

    model = dino_model()
    ckpt_file = model / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_file, weights_only=False)
    if damage == "no_trainer":
        del ckpt["trainer_name"]
    else:
        key = next(k for k, v in ckpt["network_weights"].items() if torch.is_tensor(v) and v.ndim == 4)
        ckpt["network_weights"][key] = torch.zeros(1, 1, 1, 1)
    torch.save(ckpt, ckpt_file)
    assert main(["export", "-m", str(model), "--format", "torchscript", "--size", "64", "64",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()

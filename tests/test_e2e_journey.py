"""The path a new user takes after the demo, on the demo's own folders: every command the demo prints runs as
printed (environment, export + the ONNX example, feature maps, a benchmark against the stock baseline); then plans for
another backbone and the lines that command prints: the one-minute check training, the comparison with the stock
baseline and the export, and the ONNX example the export prints."""
import itertools
import json
import os
import re
import shlex
import subprocess

import pytest
from e2e_support import BIN, run

pytestmark = pytest.mark.e2e


def test_the_demo_then_every_command_it_prints(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "2"}
    folder = tmp_path / "my demo"  # a space in the path: the printed commands must quote it
    out = run([BIN / "nnunet-dino", "demo", "--folder", folder, "--trainer", "smoke", "--device", "cpu"], env)
    assert "[4/4]" in out and "Held-out Dice" in out
    after = out.split("Next, with these folders (each line runs as printed):\n")[1].splitlines()
    steps = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("  "), after)]
    assert len(steps) == 6 and steps[0].startswith("export nnUNet_raw=")
    assert "\n".join(steps) in (folder / "summary.md").read_text()
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(steps)], env=env, capture_output=True,
                          text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (folder / "exported" / "fold_0.onnx").is_file() and (folder / "features.png").stat().st_size > 1000
    assert len(list((folder / "onnx_predictions").glob("*.png"))) == 1
    report = (folder / "benchmark" / "report.md").read_text()
    assert "Versus the baseline (nnUNetTrainer_demo)" in report
    costs = json.loads((folder / "benchmark" / "summary.json").read_text())["costs"]
    assert {c["trainer"] for c in costs} == {"nnUNetTrainer_demo", "nnUNetTrainerDinoUNet_smoke"}
    # the demo trains with --npz: nnU-Net's own model selection runs on its folders as they are
    nn_env = env | {v: str(folder / sub) for v, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                                         ("nnUNet_results", "results"))}
    run([BIN / "nnUNetv2_find_best_configuration", "987", "-c", "2d", "-tr", "nnUNetTrainerDinoUNet_smoke",
         "nnUNetTrainer_demo", "-p", "nnUNetPlans", "-f", "0"], nn_env)
    assert (folder / "results" / "Dataset987_MNI152Demo" / "inference_information.json").is_file()
    # the next step a user takes: plans for another backbone, then the lines that command prints
    env |= {v: str(folder / sub) for v, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                                 ("nnUNet_results", "results"))}
    printed = run([BIN / "nnunet-dino", "plans", "-d", "987", "--backbone", "dinov2_vits14"], env)
    train = re.findall(r"nnUNetv2_train 987 2d 0 -tr (\S+) -p (\S+)", printed)
    assert train == [("nnUNetTrainerDinoUNet_check", "nnUNetPlans_dinov2_vits14"),
                     ("nnUNetTrainerDinoUNet", "nnUNetPlans_dinov2_vits14")]
    printed = run([BIN / "nnunet-dino", "plans", "-d", "987", "--backbone", "dinov3_test_tiny"], env)
    lines = dict(re.findall(r"^(check|train|predict|compare|export): +(.+)$", printed, flags=re.M))
    assert list(lines) == ["check", "train", "predict", "compare", "export"]
    # the one-minute check as printed; compare and export as printed but for the checked model on fold 0 (the
    # printed ones name the 1000-epoch training and all five folds)
    checked = {"compare": lines["compare"].replace("nnUNetTrainer nnUNetTrainerDinoUNet ",
                                                   "nnUNetTrainer_demo nnUNetTrainerDinoUNet_check ")
                                          .replace("--folds 0 1 2 3 4", "--folds 0"),
               "export": lines["export"].replace("/nnUNetTrainerDinoUNet__", "/nnUNetTrainerDinoUNet_check__")}
    assert checked["compare"] != lines["compare"] and checked["export"] != lines["export"]
    script = "\n".join(["set -euo pipefail", f"export PATH={BIN}:$PATH", *steps[:2], f"cd {shlex.quote(str(folder))}",
                        lines["check"], checked["compare"], checked["export"]])
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Versus the baseline (nnUNetTrainer_demo)" in (folder / "benchmark_nnUNetPlans_dinov3_test_tiny" /
                                                          "report.md").read_text()
    onnx_line = re.search(r"^segment with: (.+)$", proc.stdout, flags=re.M).group(1)  # names a raw image of 987
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail\ncd {shlex.quote(str(folder))}\n{onnx_line}"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

"""The path a new user takes after the demo, on the demo's own folders: every command the demo prints runs as
printed (environment, export + the ONNX example, feature maps, a benchmark against the stock baseline), then a plans
file for another backbone whose printed train command names a trainer that builds it."""
import itertools
import json
import os
import re
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
    # the next step a user takes: plans for another backbone; the printed trainer builds them
    env |= {v: str(folder / sub) for v, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                                 ("nnUNet_results", "results"))}
    printed = run([BIN / "nnunet-dino", "plans", "-d", "987", "--backbone", "dinov2_vits14"], env)
    train = re.search(r"nnUNetv2_train 987 2d 0 -tr (\S+) -p (\S+)", printed)
    assert train.groups() == ("nnUNetTrainerDinoUNet", "nnUNetPlans_dinov2_vits14")

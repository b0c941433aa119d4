"""Helpers for the end-to-end tests: stock console scripts in a clean nnU-Net environment."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_dino.nnunet.environment import trainer_folder
from nnunet_dino.testing.synthetic import make_synthetic_dataset

BIN = Path(sys.executable).parent
SMOKE = "nnUNetTrainerDinoUNet_smoke"


def run(cmd, env, ok=True) -> str:
    """Run a console script; 40 min per command: a CI machine shared with other jobs can be 3-5x slower than idle."""
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=2400)
    out = proc.stdout + proc.stderr
    if ok and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{out[-4000:]}")
    if not ok:
        assert proc.returncode != 0, f"{cmd} should have failed:\n{out[-2000:]}"
    return out


def nnunet_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_extTrainer=trainer_folder(), nnUNet_n_proc_DA="2", nnUNet_def_n_proc="2",
               XDG_CACHE_HOME=str(root / "cache"))
    env.update(extra)
    return env


@dataclass(frozen=True)
class TrainedModel:
    root: Path
    env: dict
    raw: Path            # the raw dataset folder (imagesTs/labelsTs hold the held-out cases)
    dataset_id: str
    model: Path          # nnU-Net's model folder (trainer__plans__configuration)
    train_log: str       # console output of the fold-0 training


def train_smoke_model(root: Path) -> TrainedModel:
    env = nnunet_env(root)
    raw = make_synthetic_dataset(root / "raw", 990, num_cases=24, channels=1)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "2d", "-np", "2", "-npfp", "2"], env)
    log = ""
    for fold in ("0", "1"):
        out = run([BIN / "nnUNetv2_train", "990", "2d", fold, "-tr", SMOKE, "-device", "cpu", "--npz"], env)
        log = log or out
    model = root / "res" / "Dataset990_Synthetic1ch" / f"{SMOKE}__nnUNetPlans__2d"
    return TrainedModel(root, env, raw, "990", model, log)

"""The two things a benchmark compares in: a dataset as nnU-Net preprocessed it, and one trainer's model folder.

Their own module so that the benchmark, the training costs and the learning curve all import them from here (the
arrows between evaluation modules run one way)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # this environment's nnU-Net console scripts


@dataclass(frozen=True)
class Model:
    """One trainer's nnU-Net model folder (trainer__plans__configuration); ``name`` labels it in the report: the
    trainer, or trainer__plans where one trainer is compared under several plans (e.g. pretrained vs random)."""
    trainer: str
    plans: str
    configuration: str
    folder: Path
    name: str

    def fold_dir(self, fold: int) -> Path:
        return self.folder / f"fold_{fold}"

    def train_command(self, dataset: str, fold: int, device: str, validate_only: bool) -> list[str]:
        cmd = [str(BIN / "nnUNetv2_train"), dataset, self.configuration, str(fold), "-tr", self.trainer,
               "-p", self.plans, "--npz", "-device", device]
        return cmd + ["--val"] if validate_only else cmd


@dataclass(frozen=True)
class Dataset:
    name: str
    preprocessed: Path
    raw: Path
    labels: dict            # class name -> label or region (background dropped)
    file_ending: str
    splits: list[dict]
    label_values: frozenset = frozenset()  # every value a reference may hold (background and ignore included)

    def reader(self, plans: dict):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(plans).image_reader_writer_class()

"""``nnunet-dino benchmark``: score trainers against a baseline on nnU-Net's own folds (and a held-out test set).

It reads what stock nnU-Net writes -- each model folder's ``fold_k/validation`` predictions, the dataset's
``splits_final.json`` and ``gt_segmentations`` -- and checks that every trainer was validated on the same cases of
the same dataset with the same labels before comparing anything. With ``--train-missing`` it runs the stock
``nnUNetv2_train`` for what is absent; with ``--test`` it predicts a test set through ``nnUNetv2_predict`` (each
trainer's fold ensemble). The tables and plots are written by ``nnunet_dino.evaluation.report`` from ``cases.csv``
alone.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.evaluation.costs import training_costs
from nnunet_dino.evaluation.folders import BIN, Dataset, Model
from nnunet_dino.evaluation.metrics import case_metrics

log = logging.getLogger(__name__)


def all_label_values(dataset_json: dict) -> frozenset:
    values = set()
    for value in dataset_json["labels"].values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return frozenset(values)


def foreground_labels(dataset_json: dict) -> dict:
    return {name: value for name, value in dataset_json["labels"].items()
            if name != "background" and value != 0 and value != [0] and name != "ignore"}


def find_dataset(dataset: str, require_splits: bool = True) -> Dataset:
    """The dataset as nnU-Net preprocessed it; without splits_final.json (nothing trained yet) only when the caller
    is about to train (nnUNetv2_train writes it)."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed or not nnUNet_raw:
        raise DinoUNetError("nnUNet_raw and nnUNet_preprocessed must be set (export them as for nnUNetv2_train).")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise DinoUNetError(f"Dataset {dataset} is not in nnUNet_raw or nnUNet_preprocessed; check -d.") from None
    pre = Path(nnUNet_preprocessed) / name
    splits_file = pre / "splits_final.json"
    if not splits_file.is_file() and require_splits:
        raise DinoUNetError(f"{splits_file} does not exist; train at least one fold with nnUNetv2_train (it writes "
                            f"the splits) or add --train-missing.")
    from nnunet_dino.evaluation.label_efficiency import read_splits

    dataset_json = json.loads((pre / "dataset.json").read_text())
    splits = read_splits(splits_file) or []
    return Dataset(name, pre, Path(nnUNet_raw) / name, foreground_labels(dataset_json), dataset_json["file_ending"],
                   splits, all_label_values(dataset_json))


def find_models(dataset: Dataset, trainers: Sequence[str], plans: Sequence[str], configuration: str) -> list[Model]:
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    if len(plans) not in (1, len(trainers)):
        raise DinoUNetError(f"-p takes one plans name for all trainers or one per trainer ({len(trainers)}); "
                            f"got {len(plans)}.")
    plans = list(plans) * len(trainers) if len(plans) == 1 else list(plans)
    pairs = list(zip(trainers, plans, strict=True))
    if len(set(pairs)) != len(pairs):
        raise DinoUNetError(f"--trainers names a trainer twice with the same plans ({' '.join(trainers)}); name each "
                            f"once, or give each its own plans with -p.")
    root = Path(nnUNet_results or "") / dataset.name
    repeated = {t for t in trainers if trainers.count(t) > 1}
    return [Model(t, p, configuration, root / convert_trainer_plans_config_to_identifier(t, p, configuration),
                  f"{t}__{p}" if t in repeated else t) for t, p in pairs]


def check_same_task(dataset: Dataset, models: Sequence[Model]) -> None:
    """Refuse trainers that were trained on a different dataset or label set than the one being scored."""
    for m in models:
        plans_file, ds_file = m.folder / "plans.json", m.folder / "dataset.json"
        if not plans_file.is_file():
            continue  # not trained yet (reported by missing_runs)
        plans = json.loads(plans_file.read_text())
        if plans.get("dataset_name") != dataset.name:
            raise DinoUNetError(f"{m.folder} was trained on {plans.get('dataset_name')}, not {dataset.name}; "
                                f"benchmark trainers of one dataset.")
        labels = foreground_labels(json.loads(ds_file.read_text()))
        if labels != dataset.labels:
            raise DinoUNetError(f"{m.trainer} was trained with labels {labels} but {dataset.name} now has "
                                f"{dataset.labels}; retrain it (nnUNetv2_train ... -tr {m.trainer}) or drop it.")


def validation_cases(model: Model, fold: int, ending: str) -> set[str]:
    folder = model.fold_dir(fold) / "validation"
    return {p.name[: -len(ending)] for p in folder.glob(f"*{ending}")} if folder.is_dir() else set()


def missing_runs(dataset: Dataset, models: Sequence[Model], folds: Sequence[int]) -> list[tuple[Model, int, bool]]:
    """(model, fold, validate_only) for every fold without a complete validation; fold by fold, so that a run
    stopped early leaves every trainer comparable on the folds it finished."""
    out = []
    for fold in folds:
        for m in models:
            if (m.fold_dir(fold) / "validation" / "summary.json").is_file():
                continue
            out.append((m, fold, (m.fold_dir(fold) / "checkpoint_final.pth").is_file()))
    return out


def train_missing(dataset_id: str, runs: Sequence[tuple[Model, int, bool]], device: str) -> None:
    """Run the stock nnUNetv2_train for each missing fold, with nnU-Net's own output on the console."""
    shown = [" ".join([Path(c[0]).name, *c[1:]]) for c in (m.train_command(dataset_id, f, device, v)
                                                            for m, f, v in runs)]
    print("about to run:\n" + "\n".join(f"  {c}" for c in shown), flush=True)
    for m, fold, validate_only in runs:
        cmd = m.train_command(dataset_id, fold, device, validate_only)
        if subprocess.run(cmd).returncode != 0:
            raise DinoUNetError(f"{' '.join(cmd[1:])} failed (its output is above); fix that run, then rerun "
                                f"the benchmark.")


def check_folds(dataset: Dataset, models: Sequence[Model], folds: Sequence[int]) -> None:
    """Every fold exists in splits_final.json and every trainer validated exactly its cases."""
    for fold in folds:
        if not 0 <= fold < len(dataset.splits):
            raise DinoUNetError(f"Fold {fold} is not in {dataset.preprocessed / 'splits_final.json'} "
                                f"({len(dataset.splits)} folds: 0-{len(dataset.splits) - 1}); choose --folds from "
                                f"those.")
        expected = set(dataset.splits[fold]["val"])
        for m in models:
            got = validation_cases(m, fold, dataset.file_ending)
            if not (m.fold_dir(fold) / "validation" / "summary.json").is_file():
                raise DinoUNetError(
                    f"{m.trainer} has no validation for fold {fold} ({m.fold_dir(fold) / 'validation'}); run "
                    f"nnUNetv2_train {dataset.name} {m.configuration} {fold} -tr {m.trainer} -p {m.plans} --npz, "
                    f"or add --train-missing.")
            if got != expected:
                raise DinoUNetError(
                    f"{m.trainer} fold {fold} validated {len(got)} cases but splits_final.json lists {len(expected)} "
                    f"({len(expected - got)} missing, {len(got - expected)} extra); its folds differ from the "
                    f"others -- retrain it on this dataset's splits.")


def score_folder(pred_dir: Path, ref_dir: Path, cases: Sequence[str], dataset: Dataset, reader,
                 tolerance: dict) -> list[dict]:
    rows = []
    for case in cases:
        pred_file, ref_file = pred_dir / f"{case}{dataset.file_ending}", ref_dir / f"{case}{dataset.file_ending}"
        if not pred_file.is_file():
            raise DinoUNetError(f"{pred_file} is missing; rerun the prediction for this case.")
        if not ref_file.is_file():
            raise DinoUNetError(f"Reference {ref_file} is missing; every image needs its label file there.")
        pred, _ = reader.read_seg(str(pred_file))
        ref, props = reader.read_seg(str(ref_file))
        unknown = sorted(set(np.unique(ref).tolist()) - dataset.label_values)
        if unknown:  # scoring it as background would reward a trainer that predicts nothing there
            raise DinoUNetError(f"Reference {ref_file} (case {case}) holds label value {unknown[0]:g}, which "
                                f"dataset.json does not list (valid: {sorted(dataset.label_values)}); fix the label "
                                f"file or add the label to dataset.json.")
        spacing = np.asarray(props["spacing"], dtype=float)[-(ref.ndim - 1):]
        for row in case_metrics(pred[0], ref[0], spacing, dataset.labels, tolerance):
            rows.append({"case": case, **row})
    return rows


def score_cv(dataset: Dataset, models: Sequence[Model], folds: Sequence[int], tolerance: dict) -> list[dict]:
    rows = []
    for m in models:
        reader = dataset.reader(json.loads((m.folder / "plans.json").read_text()))
        for fold in folds:
            cases = sorted(dataset.splits[fold]["val"])
            for row in score_folder(m.fold_dir(fold) / "validation", dataset.preprocessed / "gt_segmentations",
                                    cases, dataset, reader, tolerance):
                rows.append({"split": "cv", "fold": fold, "trainer": m.name, **row})
    return rows


def test_cases(images: Path, ending: str) -> list[str]:
    cases = sorted({p.name[: -len(ending)].rsplit("_", 1)[0] for p in images.glob(f"*_0000{ending}")})
    if not cases:
        raise DinoUNetError(f"{images} holds no <case>_0000{ending} images; pass nnU-Net's imagesTs folder.")
    return cases


def predict_test(dataset_id: str, dataset: Dataset, models: Sequence[Model], fold_groups: dict[str, list[int]],
                 images: Path, labels: Path, out: Path, device: str, tolerance: dict) -> tuple[list[dict], dict]:
    """The test images predicted (stock nnUNetv2_predict) by each trainer's models of each fold group -- "ensemble"
    (split "test": the requested folds together), or one label-efficiency fold (split "curve_test") -- and scored;
    also the seconds per case of each trainer's ensemble."""
    cases = test_cases(images, dataset.file_ending)
    rows, seconds = [], {}
    for m in models:
        reader = dataset.reader(json.loads((m.folder / "plans.json").read_text()))
        for group, folds in fold_groups.items():
            ensemble = group == "ensemble"
            target = out / "test_predictions" / (m.name if ensemble else f"{m.name}_fold_{group}")
            cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(target), "-d", dataset_id,
                   "-c", m.configuration, "-tr", m.trainer, "-p", m.plans, "-f", *map(str, folds), "-device", device,
                   "-npp", "1", "-nps", "1"]
            print(f"predicting {len(cases)} test cases with {m.name} (folds {' '.join(map(str, folds))})", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd)  # nnU-Net's own progress stays on the console
            if proc.returncode != 0:
                raise DinoUNetError(f"nnUNetv2_predict failed for {m.name} (its output is above); rerun it by hand: "
                                    f"{' '.join([Path(cmd[0]).name, *cmd[1:]])}")
            took = time.perf_counter() - start
            print(f"  {m.name}: {took:.0f} s ({took / len(cases):.1f} s per case)", flush=True)
            if ensemble:
                seconds[m.name] = took / len(cases)
            for row in score_folder(target, labels, cases, dataset, reader, tolerance):
                rows.append({"split": "test" if ensemble else "curve_test", "fold": group, "trainer": m.name, **row})
    return rows, seconds


def _tolerance(value: object, what: str) -> float:
    try:
        mm = float(value)
    except (TypeError, ValueError):
        mm = math.nan
    if not (math.isfinite(mm) and mm > 0):
        raise DinoUNetError(f"{what} must be a positive number of millimetres (e.g. 1 or 2.5); got {value!r}.")
    return mm


def tolerances(labels: dict, tolerance_mm: float, per_class: Sequence[str] | None) -> dict:
    """Class name -> NSD tolerance in mm; ``per_class`` items are NAME=MM."""
    out = {name: _tolerance(tolerance_mm, "--tolerance-mm") for name in labels}
    for item in per_class or []:
        name, _, value = item.partition("=")
        if name not in labels or not value:
            raise DinoUNetError(f"--tolerance-mm-per-class takes NAME=MM with NAME one of {', '.join(labels)}; "
                                f"got {item!r}.")
        out[name] = _tolerance(value, f"--tolerance-mm-per-class {name}")
    return out


def check_handed_files(dataset: Dataset, models: Sequence[Model], folds: Sequence[int], runs, test: bool) -> None:
    """Stock nnU-Net unpickles checkpoints and imports what plans name: check every file the benchmark will hand
    it with our weights-only reader and the op allow-list first, and refuse in one line."""
    from nnunet_dino.nnunet.allowlist import check_plans_imports
    from nnunet_dino.nnunet.checkpoints import read_checkpoint

    for m in models:
        for plans_file in (m.folder / "plans.json", dataset.preprocessed / f"{m.plans}.json"):
            if plans_file.is_file():
                check_plans_imports(json.loads(plans_file.read_text()), plans_file)
    handed = [m.fold_dir(f) / "checkpoint_final.pth" for m, f, validate_only in runs if validate_only]
    if test:
        handed += [m.fold_dir(f) / "checkpoint_final.pth" for m in models for f in folds]
    for ckpt in dict.fromkeys(handed):
        if ckpt.is_file():
            read_checkpoint(ckpt)


def run_benchmark(dataset_id: str, trainers: Sequence[str], plans: Sequence[str], configuration: str,
                  folds: Sequence[int], out: Path, device: str = "cpu", test: Sequence[str] | None = None,
                  train: bool = False, tolerance_mm: float = 1.0, tolerance_per_class: Sequence[str] | None = None,
                  seed: int = 0, force: bool = False, labelled: Sequence[str] | None = None, repeats: int = 3,
                  subset_seed: int = 0) -> Path:
    """The whole command; returns the report path. ``labelled`` (sizes and/or "all") adds label-efficiency folds
    (``nnunet_dino.evaluation.label_efficiency``) drawn from ``folds``."""
    from nnunet_dino.evaluation import label_efficiency as le
    from nnunet_dino.evaluation.report import write_outputs
    from nnunet_dino.files import OutputFolder

    started = time.perf_counter()
    if len(trainers) < 2:
        raise DinoUNetError("--trainers needs a baseline and at least one other trainer (baseline first).")
    if len(set(folds)) != len(folds):
        raise DinoUNetError(f"--folds names a fold twice ({' '.join(map(str, folds))}); name each fold once.")
    if test is not None:
        images, labels = (Path(p) for p in test)
        for p in (images, labels):
            if not p.is_dir():
                raise DinoUNetError(f"--test folder {p} does not exist; pass IMAGES_FOLDER LABELS_FOLDER "
                                    f"(imagesTs labelsTs).")
    dataset = find_dataset(dataset_id, require_splits=not (train or labelled))
    tolerance = tolerances(dataset.labels, tolerance_mm, tolerance_per_class)
    models = find_models(dataset, trainers, plans, configuration)
    check_same_task(dataset, models)
    with le.SplitsLock(dataset.preprocessed) if labelled else contextlib.nullcontext():
        curve = le.plan_curve(dataset, folds, le.parse_sizes(labelled), repeats, subset_seed) if labelled else None
        run_folds = ([*folds] if curve is None or curve.with_all else []) + (curve.subset_folds if curve else [])
        runs = missing_runs(dataset, models, run_folds)
        check_handed_files(dataset, models, run_folds, runs if train else [], test is not None)
        if curve is not None and curve.changed and runs and not train:  # validated before the first write
            raise DinoUNetError(f"{len(runs)} run(s) of the label-efficiency curve are not trained; add "
                                f"--train-missing (it adds the subset folds to splits_final.json, then trains them).")
        folder = OutputFolder(out, "benchmark", force=force)
        out = folder.path
        if curve is not None:
            curve.write()  # the added folds (the user's own ones unchanged) and the sidecar naming them
    if runs and train:
        train_missing(dataset_id, runs, device)
    dataset = find_dataset(dataset_id)
    check_same_task(dataset, models)
    check_folds(dataset, models, run_folds)
    if curve is not None:
        le.check_trained_on(models, curve)
    print(f"scoring {len(models)} trainers on folds {' '.join(map(str, run_folds))} of {dataset.name}", flush=True)
    rows = score_cv(dataset, models, run_folds, tolerance)
    seconds = {}
    if test is not None:
        folder.claim("test_predictions")
        test_rows, seconds = predict_test(dataset_id, dataset, models, le.test_fold_groups(curve, folds), images,
                                          labels, out, device, tolerance)
        rows += test_rows
    costs = pd.DataFrame(training_costs(models, run_folds))
    costs["inference_s_per_case"] = costs["trainer"].map(seconds).astype(float)
    if curve is not None:
        rows = le.label_rows(rows, curve, folds)
        costs["labelled"] = costs["fold"].map(curve.labelled_of_fold())
    context = {"dataset": dataset.name, "configuration": configuration, "folds": list(folds),
               "plans": {m.name: m.plans for m in models}, "device": device,
               "images": {"cv": str(dataset.raw / "imagesTr"), "test": str(images) if test is not None else None},
               "references": {"cv": str(dataset.preprocessed / "gt_segmentations"),
                              "test": str(labels) if test is not None else None},
               "predictions": {"cv": {m.name: str(m.folder / "fold_{fold}" / "validation") for m in models},
                               "test": {m.name: str(out / "test_predictions" / m.name) for m in models}},
               "file_ending": dataset.file_ending}
    if curve is not None:
        context["label_efficiency"] = curve.describe()
    report = write_outputs(pd.DataFrame(rows), costs, context, folder, baseline=models[0].name, seed=seed,
                           keep=("test_predictions",) if test is not None else ())
    print(f"benchmark done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return report

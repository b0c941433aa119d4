"""``nnunet-dino demo``: real MRI, stock nnU-Net steps, Dice and an overlay picture, in one command.

The data is the MNI ICBM152 2009a T1 template with its grey/white-matter maps, shipped inside the ``nilearn`` wheel
(no download). Axial slices become a 2-D nnU-Net dataset (background / grey matter / white matter); two contiguous slabs
of slices are held out for testing. The demo only runs stock nnU-Net commands, so what it shows is what a user gets.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.files import atomic_write, atomic_write_json, atomic_write_text, default_file_mode

logger = logging.getLogger(__name__)

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_MNI152Demo"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}
_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


def nilearn_data_dir() -> Path:
    """nilearn's bundled data folder, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DinoUNetError("The demo needs the MNI152 files from the nilearn package: pip install nilearn.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DinoUNetError(f"nilearn is installed but lacks {missing[0]} in {folder}; reinstall it: "
                            f"pip install --force-reinstall nilearn.")
    return folder


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The demo's labels: 1 grey matter, 2 white matter where the probability maps say so (>= 50 %)."""
    label = np.zeros(t1.shape, np.uint8)
    label[(gm >= wm) & (gm >= 128)] = 1
    label[(wm > gm) & (wm >= 128)] = 2
    return label


def build_dataset(raw_root: Path, step: int = 2, holdout_fraction: float = 0.2, name: str = DATASET_NAME,
                  labels: dict[str, int] = LABELS, make_labels=tissue_labels) -> Path:
    """Write the MNI152 axial slices in nnU-Net raw format; returns the dataset folder (reuses a complete one).
    ``make_labels(t1, gm, wm)`` gives the label volume (the encoder study derives a second task from the same files)."""
    import nibabel as nib
    from PIL import Image

    out = raw_root / name
    if (out / "dataset.json").is_file():
        return out
    src = nilearn_data_dir()
    t1, gm, wm = (np.asarray(nib.load(str(src / _FILES[k])).dataobj) for k in ("t1", "gm", "wm"))
    label = make_labels(t1, gm, wm)
    slices = [z for z in range(0, t1.shape[2], step) if label[:, :, z].any()]
    # two contiguous slabs (neighbouring slices are near-identical, so random slices would leak), inside the
    # brain's extent so the held-out anatomy is of the kind the model trains on
    n_out = max(1, int(round(len(slices) * holdout_fraction / 2)))
    test = set()
    for centre in (0.3, 0.7):
        start = int(len(slices) * centre) - n_out // 2
        test.update(slices[start:start + n_out])
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=raw_root))  # ours alone, whatever else is there
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True)
    for z in slices:
        split = "Ts" if z in test else "Tr"
        image = np.flipud(t1[:, :, z].T).astype(np.uint8)  # consistent radiological view
        Image.fromarray(image).save(tmp / f"images{split}" / f"mni_z{z:03d}_0000.png")
        Image.fromarray(np.flipud(label[:, :, z].T).copy()).save(tmp / f"labels{split}" / f"mni_z{z:03d}.png")
    atomic_write_json({
        "channel_names": {"0": "T1"}, "labels": labels, "numTraining": len(slices) - len(test), "file_ending": ".png",
        "description": "MNI ICBM152 2009a T1 template (nilearn), axial slices; (c) McConnell Brain Imaging Centre",
    }, tmp / "dataset.json")
    os.chmod(tmp, default_file_mode(directory=True))
    os.replace(tmp, out)
    return out


def dice_scores(pred_dir: Path, label_dir: Path, labels: dict[str, int] = LABELS) -> dict[str, float]:
    """Mean Dice per foreground label over the PNG label maps in ``label_dir`` (1.0 where both are empty)."""
    from PIL import Image

    per_slice = [slice_dice(np.array(Image.open(lab)), np.array(Image.open(pred_dir / lab.name)), labels)
                 for lab in sorted(label_dir.glob("*.png"))]
    return {k: float(np.mean([d[k] for d in per_slice])) for k in per_slice[0]}


# one colour per foreground label, the same in the overlay, its legend and summary.md
LABEL_COLOURS = {"grey_matter": "#ff8c00", "white_matter": "#1e90ff"}


def slice_dice(truth: np.ndarray, pred: np.ndarray, labels: dict[str, int] = LABELS) -> dict[str, float]:
    """Dice per foreground label on one slice (1.0 where both are empty)."""
    out = {}
    for name, c in labels.items():
        if c == 0:
            continue
        total = np.sum(truth == c) + np.sum(pred == c)
        out[name] = float(2 * np.sum((truth == c) & (pred == c)) / total) if total else 1.0
    return out


def overlay_figure(dataset: Path, pred_dir: Path, n: int = 3):
    """Image | truth | prediction for a few held-out slices, a colour legend and the Dice of each slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from PIL import Image

    names = [k for k, v in sorted(LABELS.items(), key=lambda kv: kv[1]) if v != 0]
    cmap = ListedColormap([LABEL_COLOURS[k] for k in names])
    labels = sorted((dataset / "labelsTs").glob("*.png"))
    picks = [labels[i] for i in np.linspace(0, len(labels) - 1, n).astype(int)]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + 0.6))
    for row, lab in zip(np.atleast_2d(axes), picks, strict=True):
        img = np.array(Image.open(dataset / "imagesTs" / lab.name.replace(".png", "_0000.png")))
        truth, pred = np.array(Image.open(lab)), np.array(Image.open(pred_dir / lab.name))
        dice = slice_dice(truth, pred)
        titles = [f"{lab.stem}: T1", "truth", "prediction, Dice " + " / ".join(f"{dice[k]:.2f}" for k in names)]
        for ax, title, seg in zip(row, titles, (None, truth, pred), strict=True):
            ax.imshow(img, cmap="gray")
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg, 0), cmap=cmap, alpha=0.5, vmin=0.5, vmax=len(names) + 0.5,
                          interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.legend(handles=[Patch(color=LABEL_COLOURS[k], label=k.replace("_", " ")) for k in names],
               loc="lower center", ncol=len(names), frameon=False,
               title="Dice in the titles: " + " / ".join(k.replace("_", " ") for k in names))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def write_overlay(dataset: Path, pred_dir: Path, target: Path, n: int = 3) -> Path:
    import matplotlib.pyplot as plt

    fig = overlay_figure(dataset, pred_dir, n)
    atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)
    return target


def write_summary(target: Path, scores: dict[str, float], n_test: int, trainer: str, files: dict[str, Path],
                  steps: list[str] = ()) -> Path:
    """A short summary.md: the held-out Dice table, where everything is, and the commands to go on with."""
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in scores.items())
    where = "\n".join(f"- {k}: `{v}`" for k, v in files.items())
    if steps:
        where += "\n\nNext, with these folders:\n\n```bash\n" + "\n".join(steps) + "\n```"
    atomic_write_text(target,
        f"# nnunet-dino demo\n\nTrainer `{trainer}`, {n_test} held-out MNI152 slices.\n\n| label | Dice |\n"
        f"| --- | --- |\n{rows}\n| **mean** | **{np.mean(list(scores.values())):.3f}** |\n\n{where}\n")
    return target


def choose_trainer(trainer: str, device: str) -> str:
    if trainer == "smoke":
        return "nnUNetTrainerDinoUNet_smoke"
    if trainer == "vits16":
        return "nnUNetTrainerDinoUNet"
    from nnunet_dino.backbones.weights import find_weight_files, weights_folder

    folder = weights_folder()
    has_weights = bool(folder and find_weight_files("vits16", folder))
    return "nnUNetTrainerDinoUNet" if device == "cuda" and has_weights else "nnUNetTrainerDinoUNet_smoke"


def _run(cmd: list[str], env: dict) -> None:
    logger.info("$ %s", " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], env=env)
    if proc.returncode != 0:
        raise DinoUNetError(f"'{' '.join(str(c) for c in cmd[:2])} ...' failed (exit {proc.returncode}); see its "
                            f"output above.")


def _step(i: int, text: str) -> None:
    print(f"\n[{i}/4] {text}", flush=True)


def backbone_plans_name(backbone: str, weights: str | None) -> str:
    """The demo's plans name for a backbone: one model folder per backbone, and per random/pretrained weights."""
    return f"nnUNetPlans_demo_{backbone}{'_random' if weights == 'random' else ''}"


def write_backbone_plans(pre: Path, backbone: str, weights: str | None) -> str:
    """Plans for the demo with another backbone (and weights: a path, 'random' or None for the weights folder),
    next to the stock plans; returns the plans name. Reuses the stock preprocessed data."""
    from nnunet_dino.backbones import get_spec
    from nnunet_dino.nnunet.plans import make_plans

    get_spec(backbone)
    name = backbone_plans_name(backbone, weights)
    preset = {"backbone": backbone, "arch_kwargs": {"backbone_weights": weights} if weights else {}}
    stock = json.loads((pre / DATASET_NAME / "nnUNetPlans.json").read_text())
    plans, _ = make_plans(stock, preset, name)
    atomic_write_json(plans, pre / DATASET_NAME / f"{name}.json")
    return name


def next_steps(env: dict, folder: Path, model: Path, trainer: str, plans: str, fold: str, device: str,
               dataset: Path, backbone: str | None, weights: str | None) -> list[str]:
    """The commands a user runs next on the demo's own folders: environment, export + ONNX, feature maps, and a
    benchmark against the stock nnU-Net baseline on the same schedule."""
    from shlex import quote

    from nnunet_dino.commands.export import onnx_example_command
    from nnunet_dino.nnunet.plans import network_defaults

    image = sorted((dataset / "imagesTs").glob("*_0000.png"))[0]
    if backbone is None:  # the trainer's own backbone; the smoke one's is random by construction
        backbone = get_trainer_backbone(trainer) or network_defaults()["backbone"]
    weights_arg = f" --weights {quote(weights)}" if weights else ""
    exported = folder / "exported"
    tool = quote(str(Path(sys.executable).parent / "nnunet-dino"))  # runs as printed without an activated venv
    return [
        "export " + " ".join(f"{v}={quote(env[v])}" for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")),
        f'eval "$({tool} env)"',
        f"{tool} export -m {quote(str(model))} -f {fold} --format onnx -o {quote(str(exported))}",
        onnx_example_command(exported, quote(str(image)), quote(str(folder / "onnx_predictions"))),
        f"{tool} features {quote(str(image))} --backbone {backbone}{weights_arg} "
        f"-o {quote(str(folder / 'features.png'))}",
        f"{tool} benchmark -d {DATASET_ID} --trainers nnUNetTrainer_demo {trainer} -p nnUNetPlans {plans} "
        f"--folds {fold} --train-missing --device {device} -o {quote(str(folder / 'benchmark'))}",
    ]


def get_trainer_backbone(trainer: str) -> str | None:
    """The backbone a trainer pins (None: it follows the plans)."""
    import nnunet_dino.ext_trainers.nnunet_dino_trainers as shim

    cls = getattr(shim, trainer, None)
    return getattr(cls, "backbone_name", None)


DEMO_MARKER = ".nnunet-dino-demo"  # written into a folder the demo created (or found empty): --clean may delete it


def claim_demo_folder(folder: Path, clean: bool, force: bool) -> Path:
    """The demo's folder under the output rule: new, empty or marked as the demo's; --clean removes only such a one."""
    if folder.exists() and not folder.is_dir():
        raise DinoUNetError(f"--folder {folder} is a file; pass a folder for the demo (new or empty).")
    ours = (folder / DEMO_MARKER).is_file()
    if clean and folder.exists():
        if not ours:
            raise DinoUNetError(f"--clean deletes only a folder the demo created, and {folder} is not one; delete it "
                                f"yourself or pass another --folder.")
        shutil.rmtree(folder)
        ours = False
    if folder.is_dir() and not ours and any(folder.iterdir()) and not force:
        raise DinoUNetError(f"{folder} is not empty and was not created by the demo; pass a new or empty --folder, "
                            f"or add --force to use it (the demo then adds its nnU-Net folders there).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not ours and not force:
            atomic_write_text(folder / DEMO_MARKER, "This folder was created by nnunet-dino demo; "
                                                    "nnunet-dino demo --clean may delete it.\n")
        else:
            (folder / ".write_test").touch()
            (folder / ".write_test").unlink()
    except OSError as e:
        raise DinoUNetError(f"Demo folder {folder} is not writable ({e.strerror}); pass --folder <writable dir>."
                            ) from None
    return folder


def run_demo(folder: Path, clean: bool = False, trainer: str = "auto", device: str | None = None,
             fold: str = "0", backbone: str | None = None, weights: str | None = None, force: bool = False) -> int:
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    from nnunet_dino.nnunet.environment import check_torch_pair, default_device, ext_trainer_value

    check_torch_pair()  # a mismatched pair would fail minutes into nnU-Net's training
    folder = claim_demo_folder(folder.resolve(), clean, force)
    device = device or default_device()
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env.setdefault(var, str(folder / sub))
    env["nnUNet_extTrainer"] = ext_trainer_value()
    env.setdefault("nnUNet_n_proc_DA", str(min(4, os.cpu_count() or 1)))
    env.setdefault("nnUNet_def_n_proc", str(min(4, os.cpu_count() or 1)))
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    trainer_name = choose_trainer(trainer, device) if backbone is None else "nnUNetTrainerDinoUNet_demo"
    if weights and weights != "random":  # a file: its folder becomes the weights folder, so prediction finds it
        weights_path = Path(weights).expanduser().resolve()
        env["nnUNet_dino_weights"] = str(weights_path.parent if weights_path.is_file() else weights_path)
        weights = str(weights_path)
    bin_dir = Path(sys.executable).parent
    raw, pre, res = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"]), Path(env["nnUNet_results"])
    plans_name = "nnUNetPlans" if backbone is None else backbone_plans_name(backbone, weights)
    model = res / DATASET_NAME / convert_trainer_plans_config_to_identifier(trainer_name, plans_name, "2d")
    pred = folder / f"predictions_{trainer_name}_{plans_name}"
    print(f"nnunet-dino demo: {trainer_name} ({plans_name}) on {device}; folders under {folder}", flush=True)

    _step(1, "MNI152 slices -> nnU-Net raw dataset")
    dataset = build_dataset(raw)
    _step(2, "nnUNetv2_plan_and_preprocess (stock)")
    if not (pre / DATASET_NAME / "nnUNetPlans.json").is_file():
        _run([bin_dir / "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2", "-npfp", "2"],
             env)
    if backbone is not None:
        write_backbone_plans(pre, backbone, weights)
    _step(3, f"nnUNetv2_train ... -tr {trainer_name} -p {plans_name} (stock)")
    if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        resume = ["--c"] if (model / f"fold_{fold}").is_dir() else []
        # --npz: the validation keeps its probabilities, so nnUNetv2_find_best_configuration works on these folders
        _run([bin_dir / "nnUNetv2_train", str(DATASET_ID), "2d", fold, "-tr", trainer_name, "-p", plans_name,
              "-device", device, "--npz"] + resume, env)
    _step(4, "nnUNetv2_predict on the held-out slices (stock)")
    n_test = len(list((dataset / "labelsTs").glob("*.png")))
    if not pred.is_dir() or len(list(pred.glob("*.png"))) < n_test:
        _run([bin_dir / "nnUNetv2_predict", "-i", dataset / "imagesTs", "-o", pred, "-d", str(DATASET_ID), "-c", "2d",
              "-tr", trainer_name, "-p", plans_name, "-f", fold, "-device", device, "-npp", "1", "-nps", "1"], env)
    scores = dice_scores(pred, dataset / "labelsTs")
    overlay = write_overlay(dataset, pred, folder / "overlay.png")
    progress = model / f"fold_{fold}" / "progress.png"
    steps = next_steps(env, folder, model, trainer_name, plans_name, fold, device, dataset, backbone, weights)
    summary = write_summary(folder / "summary.md", scores, n_test, f"{trainer_name} -p {plans_name}",
                            {"overlay (image | truth | prediction)": overlay, "training progress": progress,
                             "predictions": pred, "model folder": model}, steps)
    print(f"\nHeld-out Dice ({n_test} slices, {trainer_name}):")
    for name, value in scores.items():
        print(f"  {name:<14} {value:.3f}")
    print(f"  {'mean':<14} {np.mean(list(scores.values())):.3f}")
    print(f"overlay (image | truth | prediction, colour legend, Dice per slice): {overlay}")
    print(f"training progress plot: {progress}")
    print(f"summary: {summary}")
    print("\nNext, with these folders (each line runs as printed):")
    for line in steps:
        print(f"  {line}")
    if trainer_name.endswith("_smoke"):
        print("note: the smoke trainer uses a tiny RANDOM backbone and a few iterations; it proves the pipeline, "
              "not the value of DINOv3 features.")
    return 0

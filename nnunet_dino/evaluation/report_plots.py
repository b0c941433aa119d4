"""The benchmark's plots (matplotlib, Agg): per-case distributions, paired differences, worst-case overlays."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

PLOTTED = (("dice", "Dice"), ("nsd", "NSD"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: Path) -> Path:
    from nnunet_dino.files import atomic_write

    try:
        atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        _pyplot().close(fig)
    return target


def short(trainer: str) -> str:
    """A tick label: the trainer name without nnU-Net's common prefix where something meaningful is left."""
    rest = trainer.removeprefix("nnUNetTrainer").lstrip("_")
    return rest if rest.startswith("DinoUNet") else trainer


def _jitter(n: int, centre: float, rng: np.random.Generator) -> np.ndarray:
    return centre + rng.uniform(-0.12, 0.12, n)


def distribution_plot(cases: pd.DataFrame, target: Path) -> Path:
    """Box per trainer with the cases as points: rows Dice and NSD, one column per class."""
    plt = _pyplot()
    classes, trainers = list(dict.fromkeys(cases["class"])), list(dict.fromkeys(cases["trainer"]))
    fig, axes = plt.subplots(len(PLOTTED), len(classes), figsize=(1.2 + 1.6 * len(trainers) * len(classes), 6.5),
                             squeeze=False)
    rng = np.random.default_rng(0)
    for (metric, label), row in zip(PLOTTED, axes, strict=True):
        for cls, ax in zip(classes, row, strict=True):
            data = [cases[(cases["class"] == cls) & (cases.trainer == t)][metric].to_numpy(float) for t in trainers]
            ax.boxplot(data, showfliers=False, widths=0.5)
            for i, values in enumerate(data, start=1):
                ax.plot(_jitter(len(values), i, rng), values, "o", ms=3, alpha=0.5, color="tab:blue")
            ax.set_xticks(range(1, len(trainers) + 1), [short(t) for t in trainers], rotation=20, fontsize=7)
            ax.set_title(f"{cls}: {label}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return _save(fig, target)


def paired_plot(cases: pd.DataFrame, baseline: str, target: Path) -> Path | None:
    """Per-case differences (trainer − baseline) with the mean and its bootstrap 95 % CI; zero line = no change."""
    from nnunet_dino.evaluation.stats import bootstrap_ci, paired_table

    plt = _pyplot()
    classes = list(dict.fromkeys(cases["class"]))
    others = [t for t in dict.fromkeys(cases["trainer"]) if t != baseline]
    if not others:
        return None
    fig, axes = plt.subplots(len(PLOTTED), len(classes), figsize=(1.5 + 1.8 * len(others) * len(classes), 6),
                             squeeze=False)
    rng = np.random.default_rng(0)
    for (metric, label), row in zip(PLOTTED, axes, strict=True):
        for cls, ax in zip(classes, row, strict=True):
            wide = paired_table(cases[cases["class"] == cls], metric, baseline)
            for i, t in enumerate(others, start=1):
                diffs = (wide[t] - wide[baseline]).to_numpy(float)
                ax.plot(_jitter(len(diffs), i, rng), diffs, "o", ms=3, alpha=0.5, color="tab:gray")
                low, high = bootstrap_ci(diffs, np.mean)
                ax.errorbar([i], [diffs.mean()], yerr=[[diffs.mean() - low], [high - diffs.mean()]]
                            if np.isfinite(low) else None, fmt="D", color="tab:red", capsize=4)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(range(1, len(others) + 1), [f"T{i}" for i in range(1, len(others) + 1)], fontsize=8)
            ax.set_xlim(0.5, len(others) + 0.5)
            ax.set_title(f"{cls}: Δ {label}", fontsize=9)
    # long trainer names live in one legend-like caption, never in the panel titles where they collide
    names = "\n".join(textwrap.shorten(f"T{i} = {t}", 110) for i, t in enumerate(others, start=1))
    fig.text(0.01, 0.005, f"Δ = trainer − baseline ({textwrap.shorten(baseline, 80)})\n{names}", fontsize=7,
             va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * len(others), 1, 1))
    return _save(fig, target)


def worst_cases(cases: pd.DataFrame, n: int = 3) -> list[tuple[str, str]]:
    """(fold, case) of the n cases with the lowest Dice averaged over classes and trainers."""
    mean = cases.groupby(["fold", "case"])["dice"].mean().sort_values(kind="stable")
    return [(str(f), str(c)) for f, c in mean.index[:n]]


def busiest_slice(ref: np.ndarray) -> int:
    """The slice (first axis) holding the most reference foreground, else the middle one."""
    area = ref.reshape(ref.shape[0], -1).sum(axis=1)
    return int(area.argmax()) if area.any() else ref.shape[0] // 2


def _read(path: Path, segmentation: bool) -> np.ndarray:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    ending = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    reader = determine_reader_writer_from_file_ending(ending, str(path), verbose=False)()
    array = reader.read_seg(str(path))[0] if segmentation else reader.read_images([str(path)])[0]
    return np.squeeze(array[0])


def worst_case_overlays(cases: pd.DataFrame, split: str, context: dict, out: Path, n: int = 3) -> list[Path]:
    """image | reference | each trainer, for the worst cases; skipped (empty list) when the files are gone."""
    plt = _pyplot()
    ending = context.get("file_ending")
    images, refs = (context.get(k, {}).get(split) for k in ("images", "references"))
    preds = context.get("predictions", {}).get(split, {})
    if not (ending and images and refs and preds):
        return []
    trainers = list(dict.fromkeys(cases["trainer"]))
    written = []
    for fold, case in worst_cases(cases, n):
        files = {"image": Path(images) / f"{case}_0000{ending}", "reference": Path(refs) / f"{case}{ending}"}
        files |= {t: Path(preds[t].replace("{fold}", fold)) / f"{case}{ending}" for t in trainers}
        if not all(p.is_file() for p in files.values()):
            continue
        ref = _read(files["reference"], True)
        z = busiest_slice(ref) if ref.ndim == 3 else None
        pick = (lambda a, z=z: a[z]) if z is not None else (lambda a: a)
        image = pick(_read(files["image"], False))
        fig, axes = plt.subplots(1, len(files), figsize=(2.6 * len(files), 3.0), squeeze=False)
        dice = cases[(cases.case == case) & (cases.fold.astype(str) == fold)].groupby("trainer")["dice"].mean()
        for ax, (name, path) in zip(axes[0], files.items(), strict=True):
            ax.imshow(image, cmap="gray")
            if name != "image":
                seg = pick(_read(path, True))
                ax.imshow(np.ma.masked_equal(seg, 0), cmap="tab10", alpha=0.5, vmin=0, vmax=9,
                          interpolation="nearest")
            title = short(name)
            ax.set_title(f"{title}\nDice {dice[name]:.2f}" if name in dice else title, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{split} {'fold ' + fold if split == 'cv' else ''} {case}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        written.append(_save(fig, out / f"worst_{split}_{len(written) + 1}.png"))
    return written

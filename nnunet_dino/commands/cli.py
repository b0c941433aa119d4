"""The ``nnunet-dino`` command: weights, env, plans, info, features, demo, benchmark, export. Everything else is stock
nnU-Net.

Each subcommand is a thin layer over library functions; user errors end in one line naming the fix.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.nnunet import environment
from nnunet_dino.nnunet.environment import EXT_ENV, ext_trainer_export_line, trainer_folder


def cmd_env(args: argparse.Namespace) -> int:
    environment.check_torch_pair()  # before anything is eval'd or persisted: nnU-Net would fail minutes later
    if args.unpersist:
        removed = environment.unpersist(trainer_folder())
        print(f"removed {removed}" if removed else f"nothing to remove: {environment.persist_file()} does not exist")
        return 0
    if args.persist:
        target = environment.persist(trainer_folder())
        print(f"wrote {target}: every Python of this environment now finds the Dino U-Net trainers "
              f"(undo: nnunet-dino env --unpersist)")
        return 0
    print(ext_trainer_export_line())
    if args.check:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_dino_weights"):
            print(f"# {var}={os.environ.get(var, '(unset)')}")
        folder = trainer_folder()
        if folder not in os.environ.get(EXT_ENV, "").split(os.pathsep):
            print(f"# {EXT_ENV} does not name {folder} yet: run the export line above", file=sys.stderr)
            return 1
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """List (and with --verify, fully check) the weight files; exit 1 when any check fails."""
    from nnunet_dino.backbones import BACKBONES, check_weight_file
    from nnunet_dino.backbones.weights import (
        WEIGHTS_ENV,
        cached_verification,
        expected_file_name,
        find_weight_files,
        weights_folder,
    )

    folder = Path(args.folder).expanduser() if args.folder else weights_folder()
    if folder and folder.is_file():
        raise DinoUNetError(f"--folder {folder} is a file; pass the folder that holds it: --folder {folder.parent}.")
    print(f"weights folder: {folder if folder else f'(unset: export {WEIGHTS_ENV}=<folder with Meta files>)'}")
    if folder and not folder.is_dir():
        raise DinoUNetError(f"Weights folder {folder} does not exist; create it and put Meta's DINOv3 files in it.")
    failed = 0
    print(f"{'backbone':<22} {'status':<14} file")
    claimed: set = set()
    for spec in BACKBONES.values():
        if spec.random_only:
            print(f"{spec.name:<22} {'test-only':<14} (random weights, never loaded from a file)")
            continue
        files = find_weight_files(spec.arch, folder, spec.file_naming) if folder else []
        claimed.update(f.resolve() for f in files)
        if not files:
            expected = expected_file_name(spec.arch, "<lvd1689m|sat493m>", family=spec.file_naming)
            print(f"{spec.name:<22} {'missing':<14} expected {expected} (from {spec.weights_origin})")
        for f in files:
            if not args.verify:
                print(f"{spec.name:<22} {'verified' if cached_verification(f) else 'found':<14} {f.name}")
                continue
            try:
                sha = check_weight_file(spec.name, f)
                print(f"{spec.name:<22} {'verified':<14} {f.name} (SHA-256 {sha[:12]}…, keys and shapes checked)")
            except DinoUNetError as e:
                failed += 1
                print(f"{spec.name:<22} {'FAILED':<14} {f.name}: {e}")
    for stray, should in unrecognised_weight_files(folder, claimed) if folder else []:
        if not stray.is_file():  # a link loop, a FIFO or a device (is_file follows links)
            print(f"{'?':<22} {'not a file':<14} {stray.name}: not a regular file (a link loop, a FIFO or a device); "
                  f"put the weight file itself there, under its own name")
            continue
        print(f"{'?':<22} {'not recognised':<14} {stray.name}: " + (f"rename it to {should}" if should else
              "no backbone's file name; see the expected names above"))
    for model in args.model or []:
        failed += _verify_model_folder(Path(model))
    return 1 if failed else 0


def unrecognised_weight_files(folder: Path, claimed: set) -> list[tuple[Path, str | None]]:
    """Weight-like files in the folder that no backbone would load, each with the name it should probably have
    (the backbone whose file token its name contains, longest token first)."""
    from nnunet_dino.backbones import BACKBONES
    from nnunet_dino.backbones.weights import expected_file_name

    specs = sorted((s for s in BACKBONES.values() if not s.random_only), key=lambda s: -len(s.arch))
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".pth", ".safetensors", ".pt") or Path(os.path.realpath(path)) in claimed:
            continue
        spec = next((s for s in specs if s.arch in path.name and s.file_naming.split("_")[0] in path.name), None)
        out.append((path, expected_file_name(spec.arch, family=spec.file_naming) if spec else None))
    return out


def _verify_model_folder(model: Path) -> int:
    """Check the backbone file a trained model folder records (name + SHA-256 in its plans.json); 1 if it fails."""
    import json

    from nnunet_dino.backbones import check_weight_file
    from nnunet_dino.nnunet.plans import DINO_CLASS

    plans_file = model / "plans.json"
    if not plans_file.is_file():
        raise DinoUNetError(f"{model} is not an nnU-Net model folder (no plans.json); pass the folder "
                            f"<nnUNet_results>/<Dataset>/<trainer>__<plans>__2d.")
    blocks = [c["architecture"]["arch_kwargs"] for c in json.loads(plans_file.read_text())["configurations"].values()
              if c.get("architecture", {}).get("network_class_name") == DINO_CLASS]
    recorded = [b for b in blocks if b.get("backbone_weights_sha256")]
    if not recorded:
        raise DinoUNetError(f"{plans_file} records no Dino U-Net backbone weights; train the model first.")
    for kwargs in recorded:
        name, file_name, sha = kwargs["backbone"], kwargs["backbone_weights"], kwargs["backbone_weights_sha256"]
        try:
            check_weight_file(name, file_name, expected_sha256=None if sha == "random" else sha)
            print(f"{'model':<22} {'verified':<14} {model.name}: {name} {file_name} (SHA-256 {sha[:12]}…)")
        except DinoUNetError as e:
            print(f"{'model':<22} {'FAILED':<14} {model.name}: {e}")
            return 1
    return 0


def cmd_plans(args: argparse.Namespace) -> int:
    from nnunet_dino.nnunet.plans import plans_next_steps, token_grid_note, write_plans

    if args.list or args.dataset is None:
        print_plans_choices()
        return 0
    path, needs_pp = write_plans(args.dataset, args.preset, args.plans_name, force=args.force, backbone=args.backbone,
                                 encoder_scale=args.encoder_scale, weights=args.weights)
    plans_name = path.stem
    plans = json.loads(path.read_text())
    print(f"wrote {path}")
    print(token_grid_note(plans))
    if plans["configurations"]["2d"]["architecture"]["arch_kwargs"].get("backbone_weights") == "random":
        print("weights: RANDOM -- these plans measure architecture and cost only; accuracy is meaningless")
    if needs_pp:
        print(f"this preset changes the 2d spacing; preprocess once with:\n"
              f"  nnUNetv2_preprocess -d {args.dataset} -plans_name {plans_name} -c 2d")
    for label, line in plans_next_steps(args.dataset, plans_name):
        print(f"{label + ':':<9}{line}")
    return 0


def print_plans_choices() -> None:
    """Recipes, backbones and the old preset names, in columns as wide as their longest name."""
    from nnunet_dino.backbones import BACKBONES
    from nnunet_dino.nnunet.plans import ALIASES, load_recipe, recipe_names

    sections = [
        ("recipes (--preset)", [(n, load_recipe(n)["description"]) for n in recipe_names()]),
        ("backbones (--backbone)", [(s.name, s.summary) for s in BACKBONES.values()]),
        ("aliases (--preset, a backbone with a recipe)", [(n, f"--backbone {b} --preset {r}")
                                                          for n, (b, r) in sorted(ALIASES.items())]),
    ]
    width = max(len(name) for _, rows in sections for name, _ in rows) + 2
    for title, rows in sections:
        print(title)
        for name, text in rows:
            print(f"  {name:<{width}}{text}")


def cmd_info(args: argparse.Namespace) -> int:
    import logging

    import torch

    from nnunet_dino.network import DinoUNet

    logging.getLogger("nnunet_dino").setLevel(logging.ERROR)  # random weights are fine for counting
    with torch.device("meta") if args.meta else torch.device("cpu"):
        net = DinoUNet(args.channels, args.classes, backbone=args.backbone, backbone_weights="random")
    counts = net.trainable_parameter_counts()
    print(f"{args.backbone}: taps {net.backbone.tap_layers}, width {net.backbone.embed_dim}")
    for part, n in counts.items():
        print(f"  {part:<16} {n / 1e6:9.3f} M")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from nnunet_dino.backbones import build_backbone
    from nnunet_dino.commands.features import feature_views, features_target, read_image, save_views

    target = features_target(Path(args.image), Path(args.output), args.force)
    image = read_image(Path(args.image), args.slice)
    backbone = build_backbone(args.backbone, args.weights)
    views = feature_views(image, backbone, args.layer, tuple(args.point) if args.point else None, args.size)
    weights = backbone.weights_file or "RANDOM weights"
    out = save_views(views, target, f"{args.backbone} ({weights}), {Path(args.image).name}")
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nnunet_dino.commands.demo import run_demo

    return run_demo(folder=Path(args.folder), clean=args.clean, trainer=args.trainer, device=args.device,
                    fold=args.fold, backbone=args.backbone, weights=args.weights, force=args.force)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from nnunet_dino.evaluation.benchmark import run_benchmark
    from nnunet_dino.evaluation.report import report_from_cases
    from nnunet_dino.nnunet.environment import default_device

    if args.from_cases:
        baseline = args.trainers[0] if args.trainers else None
        report = report_from_cases(Path(args.from_cases), Path(args.output), baseline, force=args.force)
    else:
        if not args.dataset or not args.trainers:
            raise DinoUNetError("benchmark needs -d DATASET and --trainers BASELINE OTHER... (or --from-cases CSV).")
        device = args.device or default_device()
        report = run_benchmark(args.dataset, args.trainers, args.plans, args.configuration, args.folds,
                               Path(args.output), device=device, test=args.test, train=args.train_missing,
                               tolerance_mm=args.tolerance_mm, tolerance_per_class=args.tolerance_mm_per_class,
                               force=args.force, labelled=args.labelled, repeats=args.repeats, subset_seed=args.seed)
    print(f"wrote {report} (+ report.html, summary.json, cases.csv, costs.csv, plots) in {report.parent}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nnunet_dino.commands.export import export_model, onnx_example_command, sample_image

    out = export_model(Path(args.model), args.folds, Path(args.output), fmt=args.format, checkpoint=args.checkpoint,
                       size=args.size, dtype=args.dtype, force=args.force)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))})")
    if args.format == "onnx":
        print(f"segment with: {onnx_example_command(out, *sample_image(Path(args.model), out))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nnunet_dino.backbones import BACKBONES

    parser = argparse.ArgumentParser(prog="nnunet-dino", description="Dino U-Net for stock nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print the nnUNet_extTrainer export line")
    p.add_argument("--check", action="store_true",
                   help="also show the nnU-Net paths and fail if the variable is not set")
    p.add_argument("--persist", action="store_true",
                   help="opt-in: write a one-line .pth into this environment so no export is needed")
    p.add_argument("--unpersist", action="store_true", help="remove the .pth written by --persist")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("weights", help="list DINOv3 weight files found, verified or missing")
    p.add_argument("--folder", help="folder to inspect (default: $nnUNet_dino_weights)")
    p.add_argument("--verify", action="store_true",
                   help="check every file now: readable, keys and shapes of its variant, hash (exit 1 on a failure)")
    p.add_argument("--model", nargs="+", metavar="MODEL_FOLDER",
                   help="also check the file each trained model folder records (name and SHA-256 in its plans.json)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("plans", help="write a Dino U-Net plans file next to nnUNetPlans.json")
    p.add_argument("-d", "--dataset", help="dataset ID or name (omit to list presets)")
    p.add_argument("--backbone", default=None, choices=list(BACKBONES),
                   help="the frozen encoder (default: the preset's, else dinov3_vits16)")
    p.add_argument("--preset", default=None,
                   help="recipe (stock, hires512) or an old preset name (default: stock; see --list)")
    p.add_argument("--plans-name", default=None,
                   help="plans name (default: nnUNetPlans_<backbone>[_<recipe>], or nnUNetPlans_<old preset name>)")
    p.add_argument("--encoder-scale", default=None, metavar="{1,2,4,auto}",
                   help="run the encoder on the patch upsampled by this factor, so the ViT sees more tokens without "
                        "re-preprocessing (default auto: 2 where the patch gives under 16 tokens per side, as our "
                        "study supports; 1: the reference); the printed token grid says what the patch gives")
    p.add_argument("--weights", default=None, metavar="random|FILE",
                   help="record the backbone weights in the plans: 'random' (architecture and cost only, accuracy "
                        "meaningless; no weight file needed) or a weight file (default: found in nnUNet_dino_weights "
                        "at training time)")
    p.add_argument("--list", action="store_true", help="list recipes, backbones and old preset names")
    p.add_argument("--force", action="store_true", help="replace an existing plans file of that name")
    p.set_defaults(func=cmd_plans)

    p = sub.add_parser("info", help="trainable parameters per paper box")
    p.add_argument("--backbone", default="dinov3_vits16", choices=list(BACKBONES))
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--meta", action="store_true", help="count on the meta device (no memory; for 7B)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("features", help="what the frozen encoder sees: PCA and cosine-similarity maps of an image")
    p.add_argument("image", help="PNG/TIFF/JPEG, or NIfTI (an axial slice)")
    p.add_argument("--backbone", default="dinov3_vits16", choices=list(BACKBONES))
    p.add_argument("--weights", default=None, help="weight file or folder (default: from nnUNet_dino_weights); "
                                                   "'random' for random weights")
    p.add_argument("--layer", type=int, default=None, help="tapped block (default: the last tap)")
    p.add_argument("--point", type=int, nargs=2, metavar=("Y", "X"),
                   help="pixel for the similarity map (default: centre)")
    p.add_argument("--slice", type=int, default=None, help="axial slice of a NIfTI volume (default: the middle)")
    p.add_argument("--size", type=int, default=448,
                   help="resize the image's long side to this many pixels first (default 448: a 28-token side)")
    p.add_argument("-o", "--output", required=True,
                   help="PNG to write, or an existing folder (then <image>_features.png in it)")
    p.add_argument("--force", action="store_true", help="replace an existing file that this command did not write")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("demo", help="real MRI demo: build dataset, plan, train, predict, Dice, overlay PNG")
    p.add_argument("--folder", default="nnunet_dino_demo", help="where the demo's nnU-Net folders go")
    p.add_argument("--clean", action="store_true",
                   help="start over (delete the demo folder first; only a folder the demo created)")
    p.add_argument("--force", action="store_true", help="use a non-empty folder the demo did not create")
    p.add_argument("--trainer", default="auto", choices=["auto", "smoke", "vits16"],
                   help="auto: ViT-S when a GPU and the ViT-S weights are present, else the CPU smoke trainer")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"], help="default: cuda if available")
    p.add_argument("--fold", default="0", help="nnU-Net fold to train (default 0)")
    p.add_argument("--backbone", default=None, choices=list(BACKBONES),
                   help="train the demo's short schedule with this backbone (plans nnUNetPlans_demo_<backbone>)")
    p.add_argument("--weights", default=None,
                   help="with --backbone: a weight file or Hugging Face folder, or 'random' "
                        "(default: the weights folder)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="per-case metrics, paired statistics and a report: trainers vs a baseline "
                                         "on nnU-Net's folds (and a test set)")
    p.add_argument("-d", "--dataset", help="dataset ID or name")
    p.add_argument("--trainers", nargs="+", metavar="TRAINER", help="baseline first, then the trainers to compare")
    p.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration (default 2d)")
    p.add_argument("-p", "--plans", nargs="+", default=["nnUNetPlans"],
                   help="plans name for all trainers, or one per trainer (default nnUNetPlans)")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--test", nargs=2, metavar=("IMAGES", "LABELS"),
                   help="also predict this test set with each trainer's fold ensemble and score it separately")
    p.add_argument("--train-missing", action="store_true",
                   help="run the stock nnUNetv2_train (--npz) for every fold without a validation")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                   help="for --train-missing and --test (default: cuda, else mps, else cpu)")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance in mm for every class (default 1)")
    p.add_argument("--tolerance-mm-per-class", nargs="+", metavar="NAME=MM", help="per-class NSD tolerances")
    p.add_argument("--labelled", nargs="+", metavar="N",
                   help="label-efficiency curve: also train on seeded subsets of N training cases of each fold "
                        "(e.g. 5 10 20 all; 'all' = the whole fold), as extra folds of splits_final.json")
    p.add_argument("--repeats", type=int, default=3, help="independent subsets per N (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draws (default 0)")
    p.add_argument("--from-cases", metavar="CASES_CSV", help="rebuild the report from a benchmark's cases.csv")
    p.add_argument("-o", "--output", required=True,
                   help="folder for the report, tables and plots (new, empty, or an earlier benchmark's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder (same-name files replaced)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export", help="a trained model (backbone included) as ONNX or TorchScript + preprocessing.json")
    p.add_argument("-m", "--model", required=True, help="<nnUNet_results>/<Dataset>/<trainer>__<plans>__2d")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to export (default 0); all are averaged")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                   help="fixed input size (multiples of 32); ONNX default: any multiple of 32")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the exported network (ONNX: float32 or float16)")
    p.add_argument("-o", "--output", required=True,
                   help="folder to write (new, empty, or an earlier export's: only its files are replaced)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder (same-name files replaced)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `nnunet-dino plans --list | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except DinoUNetError as e:
        print(f"nnunet-dino: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

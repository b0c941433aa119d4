"""Training-step time, sliding-window inference per 512² image (stock nnUNetPredictor) and peak memory for each
backbone size vs nnU-Net's PlainConvUNet 2d, as ratios measured in the same run; FLOPs and achieved TFLOP/s.

    python benchmarks/speed.py [--backbones dinov3_test_tiny dinov3_vits16 dinov3_vitb16] [--device cuda]

Device chosen automatically; on CUDA the backbone runs in bf16 autocast inside nnU-Net's fp16 AMP, as in training.
A training step is forward + backward + SGD step on a batch of 2 patches of 512² (fp16 AMP + GradScaler on CUDA).
Inference is ``nnUNetPredictor.predict_sliding_window_return_logits`` on one 512² image (patch 512², no TTA).
Reference FLOPs per 512² forward (counted from the official code): S 142, B 335, L 839 GFLOPs.
"""
from __future__ import annotations

import argparse
import functools
import logging

import torch
from network_speed import PeakMemory, dino_unet, plain_unet, time_it, train_step
from torch.utils.flop_counter import FlopCounterMode

REFERENCE_GFLOPS = {"dinov3_vits16": 142, "dinov3_vitb16": 335, "dinov3_vitl16": 839}


def predictor_for(net, device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {"dataset_name": "Dataset000_Bench", "plans_name": "bench", "image_reader_writer": "NaturalImage2DIO",
             "original_median_spacing_after_transp": [999.0, 1.0, 1.0],
             "original_median_shape_after_transp": [1, 512, 512], "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {"2d": {"data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor",
                                       "batch_size": 2, "patch_size": [512, 512], "spacing": [1.0, 1.0],
                                       "median_image_size_in_voxels": [512, 512],
                                       "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                                       "architecture": {"network_class_name": "none", "arch_kwargs": {},
                                                        "_kw_requires_import": []}}}}
    pm = PlansManager(plans)
    dataset_json = {"channel_names": {"0": "grey"}, "labels": {"background": 0, "fg": 1}, "file_ending": ".png"}
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    predictor.manual_initialization(net, pm, pm.get_configuration("2d"), None, dataset_json, "bench", (0, 1))
    return predictor


def gflops(net, x) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov3_test_tiny", "dinov3_vits16", "dinov3_vitb16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("nnunet_dino").setLevel(logging.ERROR)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name() if amp else 'CPU'}), torch {torch.__version__}")
    head = (f"{'model':<18}{'GFLOP':>8}{'ref':>6}{'step s':>9}{'x plain':>8}{'step MB':>9}{'infer s':>9}"
            f"{'x plain':>8}{'infer MB':>9}{'TFLOP/s':>9}")
    print(head + "\n" + "-" * len(head))
    base = None
    for name in ["PlainConvUNet"] + args.backbones:
        net = (plain_unet(1, 2, 512) if name == "PlainConvUNet" else dino_unet(1, 2, name, device)).to(device)
        flops = gflops(net, torch.randn(1, 1, 512, 512, device=device))
        x = torch.randn(2, 1, 512, 512, device=device)
        y = torch.randint(0, 2, (2, 512, 512), device=device)
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], 1e-3, momentum=0.99, nesterov=True)
        scaler = torch.amp.GradScaler("cuda") if amp else None

        step = functools.partial(train_step, net, x, y, opt, scaler)

        with PeakMemory(device) as step_mem:
            step_s = time_it(step, args.repeats, device)
        predictor = predictor_for(net, device)
        image = torch.randn(1, 1, 512, 512)
        with PeakMemory(device) as inf_mem:
            infer = functools.partial(predictor.predict_sliding_window_return_logits, image)
            inf_s = time_it(infer, args.repeats, device)
        base = base or (step_s, inf_s)
        tflops = flops / inf_s / 1e3
        print(f"{name:<18}{flops:>8.0f}{REFERENCE_GFLOPS.get(name, ''):>6}{step_s:>9.3f}{step_s / base[0]:>8.2f}"
              f"{step_mem.mb:>9.0f}{inf_s:>9.3f}{inf_s / base[1]:>8.2f}{inf_mem.mb:>9.0f}{tflops:>9.2f}", flush=True)
        del net, opt, predictor, infer


if __name__ == "__main__":
    main()

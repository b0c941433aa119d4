"""Cost of partial fine-tuning: frozen vs LoRA vs last-k, per backbone, as ratios to the frozen network in one run.

    python benchmarks/finetune_cost.py [--backbones dinov3_vits16 dinov3_vitb16] [--size 512] [--batch 2]

A training step is forward + backward + SGD step (fp16 AMP + GradScaler and bf16 backbone autocast on CUDA, as in
training) on random weights; the columns are step time, peak memory of the step (CUDA allocator peak / CPU
resident high-water growth), trainable parameters, and the size of the checkpoint's network weights (what
checkpoint_final.pth holds besides nnU-Net's small bookkeeping).
"""
from __future__ import annotations

import argparse
import functools
import io
import logging

import torch
from network_speed import PeakMemory, time_it, train_step

MODES = {"frozen": {}, "lora": {"backbone_lora_rank": 8}, "lastk": {"backbone_trainable_blocks": 2}}


def checkpoint_mb(net: torch.nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.tell() / 2**20


def main() -> None:
    from nnunet_dino.network import DinoUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov3_vits16", "dinov3_vitb16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.getLogger("nnunet_dino").setLevel(logging.ERROR)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name() if amp else 'CPU'}), torch {torch.__version__}, "
          f"{args.batch} x {args.size}²")
    head = f"{'backbone':<20}{'mode':<8}{'step s':>9}{'x frozen':>9}{'step MB':>9}{'trainable M':>12}{'ckpt MB':>9}"
    print(head + "\n" + "-" * len(head))
    for backbone in args.backbones:
        base = None
        for mode in args.modes:
            torch.manual_seed(0)
            with torch.device(device):
                net = DinoUNet(1, 2, backbone=backbone, backbone_weights="random", **MODES[mode])
            x = torch.randn(args.batch, 1, args.size, args.size, device=device)
            y = torch.randint(0, 2, (args.batch, args.size, args.size), device=device)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], 1e-3, momentum=0.99, nesterov=True)
            scaler = torch.amp.GradScaler("cuda") if amp else None

            step = functools.partial(train_step, net, x, y, opt, scaler)

            with PeakMemory(device) as mem:
                seconds = time_it(step, args.repeats, device)
            base = base or seconds
            trainable = net.trainable_parameter_counts()["total"] / 1e6
            print(f"{backbone:<20}{mode:<8}{seconds:>9.3f}{seconds / base:>9.2f}{mem.mb:>9.0f}{trainable:>12.2f}"
                  f"{checkpoint_mb(net):>9.1f}", flush=True)
            del net, opt


if __name__ == "__main__":
    main()

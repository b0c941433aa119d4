"""Forward and forward+backward time and peak memory: DinoUNet vs nnU-Net's PlainConvUNet, same run, same input.

    python benchmarks/network_speed.py [--backbones dinov3_vits16 ...] [--size 512] [--batch 1 2] [--repeats 3]

Prints a table with ratios against PlainConvUNet (2d plans-like: 8 stages, 32..512 features, InstanceNorm, LeakyReLU)
measured in the same process. CUDA: bf16 backbone under fp16 autocast as in nnU-Net training; CPU: fp32.
Backbone weights are random (speed does not depend on the values).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn


def plain_unet(in_ch: int, classes: int, size: int) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = min(8, size.bit_length() - 2)  # nnU-Net's 2d plans: pool down to ~4 px, 512 features max
    return PlainConvUNet(in_ch, n, [min(32 * 2**i, 512) for i in range(n)], nn.Conv2d, 3, [1] + [2] * (n - 1), 2,
                         classes, [2] * (n - 1), True, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None,
                         nn.LeakyReLU, {"inplace": True}, deep_supervision=False)


def dino_unet(in_ch: int, classes: int, backbone: str, device) -> nn.Module:
    from nnunet_dino.network import DinoUNet

    dtype = "bfloat16" if backbone == "dinov3_vit7b16" else None
    with torch.device(device):  # random init directly on the target device (7B: seconds on a GPU, not minutes)
        return DinoUNet(in_ch, classes, backbone=backbone, backbone_weights="random", backbone_dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPU, resident-set high-water mark growth on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
                f.write("5")
            self.base = proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else proc_status_bytes("VmHWM")
        self.mb = (peak - self.base) / 2**20


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, scaler) -> None:
    """One training step as nnU-Net takes it: fp16 autocast on CUDA with a GradScaler (``scaler`` None: fp32)."""
    net.train()
    with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def time_it(fn, repeats: int, device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(net: nn.Module, x: torch.Tensor, repeats: int, device) -> dict:
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    net.eval()

    def forward():
        with torch.no_grad(), amp:
            net(x)

    def train_step():
        with amp:
            net(x).float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    with PeakMemory(device) as fwd_mem:
        fwd = time_it(forward, repeats, device)
    net.train()
    with PeakMemory(device) as step_mem:
        step = time_it(train_step, repeats, device)
    return {"fwd_s": fwd, "step_s": step, "fwd_mb": fwd_mem.mb, "step_mb": step_mem.mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov3_test_tiny", "dinov3_vits16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.getLogger("nnunet_dino").setLevel(logging.ERROR)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, input 3x{args.size}^2")
    header = (f"{'model':<22}{'batch':>6}{'fwd s':>9}{'x plain':>9}{'fwd+bwd s':>11}{'x plain':>9}{'fwd MB':>9}"
              f"{'step MB':>9}")
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        base = None
        for name in ["PlainConvUNet"] + args.backbones:
            net = (plain_unet(3, 2, args.size) if name == "PlainConvUNet" else dino_unet(3, 2, name, device)).to(device)
            r = measure(net, x, args.repeats, device)
            base = base or r
            print(f"{name:<22}{batch:>6}{r['fwd_s']:>9.3f}{r['fwd_s'] / base['fwd_s']:>9.2f}{r['step_s']:>11.3f}"
                  f"{r['step_s'] / base['step_s']:>9.2f}{r['fwd_mb']:>9.0f}{r['step_mb']:>9.0f}", flush=True)
            del net


if __name__ == "__main__":
    main()

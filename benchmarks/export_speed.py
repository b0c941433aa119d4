"""Exported network vs PyTorch on the CPU: onnxruntime (and TorchScript) time per 512² image, and the largest
difference of the logits, for real backbone layouts (random weights), as ratios measured in the same run.

    python benchmarks/export_speed.py [--backbones dinov3_vits16] [--size 512] [--threads N]

One forward of the whole network (backbone included) on a batch of one image; median of --repeats runs after a
warm-up. The ONNX graph is exported the way ``nnunet-dino export`` does (dynamic batch and size).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    import onnxruntime as ort

    from nnunet_dino.commands.export import Segmenter, _export_onnx, _export_torchscript
    from nnunet_dino.network import DinoUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["dinov3_vits16"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    logging.getLogger("nnunet_dino").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}, 1 x {args.size}²")
    head = f"{'backbone':<16}{'runtime':<14}{'s/image':>9}{'x torch':>9}{'max |diff|':>12}{'export s':>10}"
    print(head + "\n" + "-" * len(head))
    for backbone in args.backbones:
        torch.manual_seed(0)
        net = Segmenter(DinoUNet(1, 3, backbone=backbone, backbone_weights="random")).eval()
        x = torch.randn(1, 1, args.size, args.size)
        with torch.no_grad():
            expected = net(x).numpy()
            torch_s = median_seconds(lambda: net(x), args.repeats)
        print(f"{backbone:<16}{'pytorch':<14}{torch_s:>9.3f}{1.0:>9.2f}{'':>12}{'':>10}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            _export_onnx(net, torch.randn(2, 1, 64, 96), Path(tmp) / "net.onnx", dynamic=True)
            export_s = time.perf_counter() - start
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(Path(tmp) / "net.onnx"), options, providers=["CPUExecutionProvider"])
            got = session.run(None, {"x": x.numpy()})[0]
            ort_s = median_seconds(lambda: session.run(None, {"x": x.numpy()}), args.repeats)
            print(f"{backbone:<16}{'onnxruntime':<14}{ort_s:>9.3f}{ort_s / torch_s:>9.2f}"
                  f"{np.abs(got - expected).max():>12.2e}{export_s:>10.0f}", flush=True)
            start = time.perf_counter()
            _export_torchscript(net, x, Path(tmp) / "net.pt")
            export_s = time.perf_counter() - start
            traced = torch.jit.load(str(Path(tmp) / "net.pt"))
            with torch.no_grad():
                got = traced(x).numpy()
                ts_s = median_seconds(lambda: traced(x), args.repeats)
            print(f"{backbone:<16}{'torchscript':<14}{ts_s:>9.3f}{ts_s / torch_s:>9.2f}"
                  f"{np.abs(got - expected).max():>12.2e}{export_s:>10.0f}", flush=True)


if __name__ == "__main__":
    main()

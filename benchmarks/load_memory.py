"""Peak RAM of loading a backbone from a Meta-format file through ``build_backbone`` (memory-mapped path).

    python benchmarks/load_memory.py --backbone dinov3_vit7b16 --workdir /big/disk [--dtype bfloat16] [--keep]

Writes a full-size Meta-format checkpoint (7B: 26.9 GB fp32) without ever holding it in RAM (tensors are views of
a memory-mapped scratch file), then loads it in a fresh process and samples anonymous RSS (the memory that cannot
be paged back to the file) every 20 ms. Reports peak anonymous RSS, peak total RSS, time to hash (first use) and
time to build. Files are deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from network_speed import proc_status_bytes


def shapes_of(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from nnunet_dino.testing.synthetic import meta_state_dict

    with torch.device("meta"):
        sd = meta_state_dict(name, device="meta")
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def write_big_checkpoint(name: str, workdir: Path) -> Path:
    from nnunet_dino.backbones import BACKBONES

    layout = shapes_of(name)
    total = sum(int(np.prod(s)) for s, _ in layout.values())
    scratch = workdir / "scratch.f32"
    block = (np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32) * 0.02)
    with open(scratch, "wb") as f:
        for _ in range(0, total, block.size):
            f.write(block.tobytes())
    mm = np.memmap(scratch, dtype=np.float32, mode="r")
    sd, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        n = int(np.prod(shape))
        t = torch.from_numpy(np.asarray(mm[offset:offset + n])).view(shape)
        if key.endswith(("gamma", "norm.weight", "norm1.weight", "norm2.weight")):
            t = torch.full(shape, 0.5 if key.endswith("gamma") else 1.0)
        sd[key] = t.to(dtype) if dtype != torch.float32 else t
        offset += n
    out = workdir / f"dinov3_{BACKBONES[name].arch}_pretrain_lvd1689m.pth"
    torch.save(sd, out)
    del sd, mm
    scratch.unlink()
    return out


def measure_load(path: str, name: str, dtype: str | None) -> None:
    """Runs in a fresh process: hash + build, sampling memory in a thread."""
    from nnunet_dino.backbones import build_backbone
    from nnunet_dino.backbones.weights import file_sha256

    base_anon = proc_status_bytes("RssAnon")
    peaks = [0, 0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            a, t = proc_status_bytes("RssAnon"), proc_status_bytes("VmRSS")
            peaks[0], peaks[1] = max(peaks[0], a), max(peaks[1], t)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    file_sha256(path)
    t1 = time.perf_counter()
    bb = build_backbone(name, path, dtype=getattr(torch, dtype) if dtype else None)
    t2 = time.perf_counter()
    stop.set()
    size = os.path.getsize(path) / 2**30
    params = sum(p.numel() for p in bb.parameters())
    print(f"{name}: file {size:.1f} GiB, {params / 1e9:.2f} B params, dtype {dtype or 'float32'}")
    print(f"  hash (first use) {t1 - t0:.0f} s, build {t2 - t1:.0f} s")
    print(f"  peak anonymous RSS {(peaks[0] - base_anon) / 2**30:.2f} GiB above the interpreter "
          f"(peak total RSS incl. file-backed pages {peaks[1] / 2**30:.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov3_vit7b16")
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16"])
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure_load(args.measure, args.backbone, args.dtype)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = write_big_checkpoint(args.backbone, workdir)
    print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    try:
        cmd = [sys.executable, __file__, "--backbone", args.backbone, "--measure", str(path)]
        subprocess.run(cmd + (["--dtype", args.dtype] if args.dtype else []), check=True,
                       env={**os.environ, "XDG_CACHE_HOME": str(workdir / "cache")})
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

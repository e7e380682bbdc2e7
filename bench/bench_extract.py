"""Images/s of `agch-data extract` per backbone (a script, not a test).

    python bench/bench_extract.py [--device cpu|cuda] [--n 32] [--batch-size 8] [--workers 1] [--threads N]
                                  [--backbones alexnet vgg16 vgg19]

Writes a MATLAB v7.3 file of N random 224 x 224 images the way the field's mirflickr25k-iall.mat holds them
(h5py: N x 3 x W x H uint8, written in blocks so 20,015 images never sit in memory), then per backbone (random
weights) prints: images/s of the whole extraction (reading, preprocessing in the DataLoader, forward pass, writing
the v7.3 XAll file), images/s of the forward pass alone on one preloaded batch (the ceiling), GFLOP per image
(torch's FlopCounterMode) and the hours the whole extraction would take for MIRFlickr-25K (20,015 images) and
NUS-WIDE (186,577) at the measured rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from agch.data.backbones import build_backbone
from agch.data.extract import extract_features
from agch.data.extract_options import BACKBONES
from agch.method.device import resolve_device

SIZES = {"MIRFlickr-25K": 20015, "NUS-WIDE": 186577}


def write_images(path: Path, n: int, seed: int = 0, block: int = 256) -> Path:
    """N random 224 x 224 RGB images as a v7.3 IAll (h5py N x 3 x W x H uint8), written block by block."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w", userblock_size=512) as f:
        dset = f.create_dataset("IAll", shape=(n, 3, 224, 224), dtype=np.uint8, chunks=(1, 3, 224, 224))
        dset.attrs["MATLAB_class"] = np.bytes_("uint8")
        for start in range(0, n, block):
            stop = min(n, start + block)
            dset[start:stop] = rng.integers(0, 256, (stop - start, 3, 224, 224), dtype=np.uint8)
    return path


def forward_only(name: str, device: torch.device, batch_size: int, precision: str, repeats: int = 3) -> float:
    """Best-of-repeats images/s of the backbone alone on one preloaded batch."""
    model = build_backbone(name).to(device)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    best = float("inf")
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(x)  # warm-up
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return batch_size / best


def gflop_per_image(name: str) -> float:
    """Forward FLOPs of one 224 x 224 image, counted by torch."""
    model = build_backbone(name)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32, help="images (default 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"device {device}, precision {precision}, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}, {args.n} images, batch {args.batch_size}, {args.workers} DataLoader workers")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images = write_images(Path(tmp) / "iall.mat", args.n)
        print(f"wrote {args.n} random images as v7.3 IAll in {time.perf_counter() - t0:.1f} s")
        for name in args.backbones:
            result = extract_features(images, Path(tmp) / f"{name}.mat", backbone=name, random_weights=True,
                                      batch_size=args.batch_size, workers=args.workers, device=str(device),
                                      precision=precision, progress=False)
            ceiling = forward_only(name, device, args.batch_size, precision)
            hours = ", ".join(f"{label} {n / result.images_per_s / 3600:.2f} h" for label, n in SIZES.items())
            print(f"{name:8s} extract {result.images_per_s:8.1f} images/s | forward only {ceiling:8.1f} images/s | "
                  f"{gflop_per_image(name):5.1f} GFLOP/image | at this rate: {hours}")


if __name__ == "__main__":
    main()

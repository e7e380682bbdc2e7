"""Training throughput at MIRFlickr size against this machine's measured matmul throughput (a script, not a test).

    python bench/bench_train.py [--device cpu|cuda] [--batch-sizes 32 128] [--epochs 2] [--threads N] [--bf16]
                                [--n-train 5000]

Builds a random feature file of MIRFlickr-25K's shape (5,000 train pairs, 4096-d image, 1386-d binary text,
24 labels; a small query/retrieval set, since evaluation is benchmarked by bench_map.py), trains the paper preset
at 64 bits, and prints seconds per epoch and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on one
training step) as a fraction of torch's own dense matmul throughput measured in the same run. On CUDA it measures
an fp32 and a bf16 matmul baseline, reports the share against the one matching the run's precision (--bf16: the
trainer's bf16 autocast, config.bf16) and prints the peak GPU memory allocated by each run. --n-train shrinks the
training set for a quick smoke run (bench/gpu_check.sh --cpu-smoke); the default is MIRFlickr size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from agch.config import apply, preset
from agch.data.dataset import open_dataset, write_dataset
from agch.method.losses import agch_loss
from agch.method.model import AGCH
from agch.method.similarity import batch_similarity
from agch.data.splits import make_split
from agch.method.device import resolve_device
from agch.method.train import train


def matmul_gflops(device: torch.device, n: int = 4096, m: int = 128, repeats: int = 20,
                  dtype: torch.dtype = torch.float32) -> float:
    """Best-of-repeats throughput of an (m x n) @ (n x n) matmul in `dtype`, the shape of the model's big layers."""
    a, b = torch.randn(m, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * n * n / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(config, image_dim: int, text_dim: int, device: torch.device) -> int:
    """FLOPs of one training step (similarity, forward, loss, backward) at the config's batch size."""
    model = AGCH(image_dim, text_dim, config).to(device)
    zv = torch.rand(config.batch_size, image_dim, device=device)
    zt = (torch.rand(config.batch_size, text_dim, device=device) < 0.0034).float()
    with FlopCounterMode(display=False) as counter:
        s, adj = batch_similarity(zv, zt, config)
        agch_loss(model(zv, zt, adj), s, config)["total"].backward()
    return counter.get_total_flops()


def make_file(path: Path, n_train: int = 5000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = n_train + 600
    image = np.maximum(rng.normal(size=(n, 4096)) - 1.0, 0).astype(np.float16)
    text = (rng.random((n, 1386)) < 0.0034).astype(np.uint8)
    labels = (rng.random((n, 24)) < 0.15).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    split = make_split("standard", n, seed=0, n_query=100, n_train=n_train)
    write_dataset(path, image=image, text=text, labels=labels, split=split,
                  meta={"name": "bench-random", "source_files": [], "feature_extractor": "random (benchmark)",
                        "synthetic": {"image": "random", "text": "random", "labels": "random"},
                        "split_protocol": "standard", "split_seed": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per batch size (best one reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 gives stable figures on a loaded machine")
    parser.add_argument("--n-train", type=int, default=5000,
                        help="training pairs (default 5000, MIRFlickr size; small values for a smoke run)")
    parser.add_argument("--bf16", action="store_true",
                        help="train with bf16 autocast (config.bf16; CUDA only, ignored on CPU)")
    args = parser.parse_args()
    # as the agch commands do at start-up: the trainer asks for deterministic cuBLAS, which must be set before the
    # baselines below create the cuBLAS handle, so that the timed runs are the ones a search would make
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"threads {torch.get_num_threads()}"
    print(f"device: {device} ({where})  torch {torch.__version__}  load average {os.getloadavg()[0]:.1f}")
    peak = matmul_gflops(device)
    print(f"baseline: torch fp32 matmul 128x4096 @ 4096x4096: {peak:.1f} GFLOP/s (measured now)")
    precision = "fp32"
    if cuda:
        peak_bf16 = matmul_gflops(device, dtype=torch.bfloat16)
        print(f"baseline: torch bf16 matmul 128x4096 @ 4096x4096: {peak_bf16:.1f} GFLOP/s (measured now)")
        if args.bf16:
            peak, precision = peak_bf16, "bf16"
    elif args.bf16:
        print("--bf16 ignored: bf16 autocast is CUDA only (config.bf16)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        make_file(path, n_train=args.n_train)
        with open_dataset(path) as data:
            for bs in args.batch_sizes:
                config = apply(preset("paper"), {"bits": 64, "batch_size": bs, "epochs": args.epochs,
                                                 "eval_every": 10_000, "bf16": args.bf16})
                flops = step_flops(config, data.image_dim, data.text_dim, device)
                steps = len(data.split.train) // bs
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                result = train(config, data, device=str(device))
                epoch_s = min(row["seconds"] for row in result.history)
                achieved = flops * steps / epoch_s / 1e9
                memory = (f", GPU peak allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                          if cuda else "")
                print(f"batch {bs:4d} {precision}: {epoch_s:6.2f} s/epoch over {len(data.split.train)} pairs, "
                      f"{flops / 1e9:.2f} GFLOP/step, {achieved:6.1f} GFLOP/s = {achieved / peak:.0%} of the "
                      f"{precision} matmul baseline{memory}")


if __name__ == "__main__":
    main()

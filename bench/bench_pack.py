"""K training trials packed on one device at once against one trial alone (a script, not a test).

    python bench/bench_pack.py [--device cuda] [--packs 1 2 4] [--epochs 3] [--n-train 5000] [--batch-size 32]
                               [--threads 1]

This is what a search with `resources.gpus: 1/K` and concurrency K does to a GPU. Ray's fractional GPUs are
bookkeeping only: Ray sets CUDA_VISIBLE_DEVICES for each trial and nothing else (no memory or compute partition), so
the K trial processes share the whole device. Here K plain processes (multiprocessing, 'spawn' context) each train
the paper preset (64 bits) on the same random MIRFlickr-shaped file (bench_train.make_file) for E epochs, starting
together (a barrier after each process's CUDA start-up). Each reports its epoch seconds (the first epoch is left
out when E >= 2: warm-up) and its peak memory: on CUDA torch.cuda.max_memory_allocated (plus the allocator's
reserved peak; the CUDA context, some hundreds of MiB per process, is in neither), on CPU the peak resident set.
Per K it prints the total throughput (training pairs per second summed over the processes), its ratio to one
trial alone (K=1, always measured first) and the peak memory per trial. On CPU (the smoke mode of
bench/gpu_check.sh) each process gets --threads torch threads.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench_train import make_file  # bench/ is on sys.path when this runs as a script (and in spawned children)

from agch.config import apply, preset
from agch.data.dataset import open_dataset
from agch.method.device import resolve_device
from agch.method.train import train


def trial(rank: int, path: str, device: str, epochs: int, batch_size: int, threads: int, barrier, results) -> None:
    """One trial process: train, then put (rank, epoch seconds, peak allocated, peak reserved, error) on `results`."""
    try:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work, as the agch commands do
        torch.set_num_threads(threads)
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.zeros(1, device=dev)  # CUDA start-up before the barrier
        config = apply(preset("paper"), {"bits": 64, "batch_size": batch_size, "epochs": epochs,
                                         "eval_every": 10_000, "seed": rank})
        with open_dataset(path) as data:
            barrier.wait(timeout=600)
            result = train(config, data, device=str(dev))
        seconds = [row["seconds"] for row in result.history]
        if dev.type == "cuda":
            peak, reserved = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
        else:
            peak, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, None  # Linux: KiB
        results.put((rank, seconds, peak, reserved, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        barrier.abort()
        results.put((rank, None, None, None, traceback.format_exc()))


def run_pack(k: int, path: Path, args: argparse.Namespace) -> list[tuple]:
    """Start k trial processes at once; their results, or SystemExit naming the failure."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=trial, args=(rank, str(path), args.device, args.epochs, args.batch_size,
                                             args.threads, barrier, results)) for rank in range(k)]
    for p in procs:
        p.start()
    got: list[tuple] = []
    while len(got) < k:
        try:
            got.append(results.get(timeout=5))
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:  # killed without reporting (out of memory, a signal)
                for p in procs:
                    p.kill()
                raise SystemExit(f"pack {k}: a trial process died with exit code {dead[0]} and no report")
    for p in procs:
        p.join()
    errors = [error for *_, error in got if error]
    if errors:
        raise SystemExit(f"pack {k}: {len(errors)} trial(s) failed; the first:\n{errors[0]}")
    return sorted(got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4], help="trials at once (1 always runs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (the first is warm-up when >= 2)")
    parser.add_argument("--n-train", type=int, default=5000, help="training pairs (default 5000, MIRFlickr size)")
    parser.add_argument("--batch-size", type=int, default=preset("paper").batch_size,
                        help="batch size (default: the paper preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per trial process (default 1)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.device = str(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} thread(s) per trial"
    memory_kind = "GPU peak allocated" if device.type == "cuda" else "peak resident"
    print(f"device: {device} ({where})  torch {torch.__version__}  load average {os.getloadavg()[0]:.1f}; "
          f"paper preset, 64 bits, batch {args.batch_size}, {args.n_train} pairs, {args.epochs} epoch(s) per trial")
    packs = [1] + [k for k in dict.fromkeys(args.packs) if k != 1]
    alone = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        make_file(path, n_train=args.n_train)
        for k in packs:
            t0 = time.perf_counter()
            got = run_pack(k, path, args)
            wall = time.perf_counter() - t0
            per_trial = []
            for _, seconds, *_ in got:
                steady = seconds[1:] if len(seconds) > 1 else seconds
                per_trial.append(args.n_train / statistics.mean(steady))
            total = sum(per_trial)
            alone = alone or total
            peaks = [peak / 2**20 for _, _, peak, _, _ in got]
            reserved = [r / 2**20 for *_, r, _ in got if r is not None]
            memory = f"{memory_kind} {max(peaks):.0f} MiB per trial (max over {k})"
            if reserved:
                memory += f", reserved {max(reserved):.0f} MiB"
            print(f"pack {k}: total {total:8.1f} pairs/s = {total / alone:.2f}x one trial alone; per trial "
                  f"{min(per_trial):.1f}-{max(per_trial):.1f} pairs/s; {memory}; wall {wall:.1f} s with start-up")


if __name__ == "__main__":
    main()

"""Time agch.evaluation.metrics.evaluate_hashing against the per-query numpy oracle at MIRFlickr-25K or NUS-WIDE size.

mirflickr: 2,000 queries x 18,015 database items (the project's standard split), random +-1 codes, the real
MIRFlickr-25K labels when ../shared/data has them (else random multi-hot labels, and the output says so).
nuswide: 2,000 queries x 186,577 database items, random +-1 codes, random multi-hot labels over 21 concepts (no
real NUS-WIDE labels here). Off the CPU the result is also checked against the CPU's (exact agreement expected).
Run from the repository root:

    python bench/bench_map.py [--device cuda] [--size nuswide] [--repeats 3] [--threads 1] [--no-oracle]

--n-queries and --n-database shrink the problem for a smoke run (bench/gpu_check.sh --cpu-smoke): random labels of
the size's label count over that many pairs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
N_QUERIES = 2000
SIZES = {"mirflickr": (20015, 24), "nuswide": (188577, 21)}
"""Pairs and label count of each dataset size (NUS-WIDE: the 21-concept subset, 2,000 queries + 186,577)."""


def random_labels(n: int, n_labels: int, seed: int) -> np.ndarray:
    """(n, n_labels) uint8 random multi-hot labels, at least one per row."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < 0.16).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, n_labels, n)] = 1
    return labels


def load_labels(size: str, data_dir: Path, seed: int, n_pairs: int | None = None) -> tuple[np.ndarray, str]:
    """Labels of the size's shape: the real MIRFlickr-25K LAll where available, else random multi-hot ones (always
    random when `n_pairs` overrides the size's number of pairs)."""
    n, n_labels = SIZES[size]
    if n_pairs is not None:
        return random_labels(n_pairs, n_labels, seed), f"SYNTHETIC random multi-hot labels over {n_labels} concepts"
    path = data_dir / "mirflickr25k-lall.mat"
    if size == "mirflickr" and path.exists():
        import scipy.io

        return scipy.io.loadmat(path)["LAll"], "real MIRFlickr-25K labels"
    missing = f" ({path} not found)" if size == "mirflickr" else ""
    return random_labels(n, n_labels, seed), f"SYNTHETIC random multi-hot labels over {n_labels} concepts{missing}"


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device for evaluate_hashing (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--size", choices=SIZES, default="mirflickr", help="database size (default mirflickr)")
    parser.add_argument("--no-oracle", dest="oracle", action="store_false",
                        help="skip the per-query oracle loop (at NUS-WIDE size it takes minutes on a CPU)")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timings are the best of this many runs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the random codes")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--n-queries", type=int, default=N_QUERIES, help=f"queries (default {N_QUERIES})")
    parser.add_argument("--n-database", type=int, default=None,
                        help="database items (default: the size's; set: random labels, for a smoke run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(REPO_ROOT))  # for tests.map_oracle when run as a script
    from agch.evaluation.metrics import evaluate_hashing
    from agch.data.splits import make_split
    from tests.map_oracle import oracle_map, oracle_relevance

    device = torch.device(args.device)
    n_pairs = None if args.n_database is None else args.n_queries + args.n_database
    labels, label_source = load_labels(args.size, args.data_dir, args.seed, n_pairs)
    split = make_split("standard", len(labels), seed=args.seed, n_query=args.n_queries,
                       n_train=min(5000, len(labels) - args.n_queries))  # (the training rows are not used here)
    query_labels, db_labels = labels[split.query], labels[split.retrieval]
    rng = np.random.default_rng(args.seed)
    query_codes = rng.choice(np.array([-1, 1], dtype=np.int8), (args.n_queries, args.bits))
    db_codes = rng.choice(np.array([-1, 1], dtype=np.int8), (len(db_labels), args.bits))
    tensors = [torch.from_numpy(a).to(device) for a in (query_codes, db_codes, query_labels, db_labels)]
    protocol = (f"I->T-style {args.bits} bits, random +-1 codes, {label_source}, "
                f"standard split (seed {args.seed}) {args.n_queries} queries x {len(db_labels)} database")
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"device: {device} ({where}); torch {torch.__version__}, numpy {np.__version__}")

    def run(ks: tuple[int | None, ...], **kwargs: object) -> Callable[[], object]:
        return lambda: evaluate_hashing(*tensors, ks=ks, **kwargs)

    metrics_only = {"precision_ks": (), "pr_curve": False}
    evaluate_hashing(*(t[:50] for t in tensors), ks=(None,), **metrics_only)  # loads (or compiles) the CPU kernel
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_all, m_all = best_time(run((None,), **metrics_only), args.repeats)
    if device.type == "cuda":
        peak = f"GPU peak allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    else:
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak = f"peak resident memory +{rss_after - rss_before:.0f} MiB over the inputs"
    t_50, m_50 = best_time(run((50,), **metrics_only), args.repeats)
    t_full, _ = best_time(run((50, None)), args.repeats)

    print(f"mAP@ALL {m_all.map['map@all']:.4f} evaluate_hashing on {device}; {protocol}")
    if device.type != "cpu":
        on_cpu = evaluate_hashing(*(t.cpu() for t in tensors), ks=(None,), **metrics_only).map["map@all"]
        print(f"mAP@ALL {on_cpu:.4f} evaluate_hashing on cpu (|diff| {abs(m_all.map['map@all'] - on_cpu):.1e}); "
              f"{protocol}")
    print(f"mAP@50  {m_50.map['map@50']:.4f} evaluate_hashing; {protocol}")
    print(f"time mAP@ALL: evaluate_hashing {t_all * 1e3:.0f} ms ({peak})")
    if args.oracle:
        oracle_relevant = oracle_relevance(query_labels, db_labels)  # not timed: its int64 matmul is naive

        def oracle() -> float:
            # Hamming distances by a numpy float32 matmul, then the per-query loop of tests/map_oracle.py
            dist = (args.bits - query_codes.astype(np.float32) @ db_codes.astype(np.float32).T) / 2
            return oracle_map(dist, oracle_relevant, None)

        oracle_repeats = max(1, min(args.repeats, 2))
        t_oracle, map_oracle = best_time(oracle, oracle_repeats)
        print(f"mAP@ALL {map_oracle:.4f} oracle (|diff| {abs(m_all.map['map@all'] - map_oracle):.1e}); {protocol}")
        print(f"time mAP@ALL: oracle {t_oracle * 1e3:.0f} ms (best of {oracle_repeats}), "
              f"speed-up {t_oracle / t_all:.1f}x")
    print(f"time mAP@50:  evaluate_hashing {t_50 * 1e3:.0f} ms")
    print(f"time mAP@50 + mAP@ALL + precision@k + PR curve, one call: evaluate_hashing {t_full * 1e3:.0f} ms")
    print(f"(wall clock, best of {args.repeats} runs. evaluate_hashing times include distances and relevance, the "
          f"oracle's include distances. Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other "
          f"processes slow multi-threaded torch a lot, compare with --threads 1)")


if __name__ == "__main__":
    main()

"""Overhead of agch-search: N trials through the full service vs the same N trainer calls in a plain loop.

The search side is the real command (a subprocess: Ray start-up, MLflow and Optuna stores, checkpoints, the console)
over a grid of N δ values, one trial at a time with every core, so both sides do the same training work. The loop
side opens the dataset once and calls agch.train.train N times with the same configs, without tracking.

    python bench/bench_search.py --trials 4 --epochs 3            # the default synthetic dataset
    python bench/bench_search.py --data tiny.h5 --set text_hidden=64 --set gcn_hidden=64

Prints both wall times, the ratio (search / loop) and the mean trial length; the loop runs first, so both sides read
the dataset from a warm page cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

NETWORKS = {"text_hidden": 512, "gcn_hidden": 512}
"""The shipped spaces' CPU-sized networks (search_spaces/*.yaml)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="N: trials (and loop iterations)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the bundled synthetic one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config override on top of {NETWORKS}")
    args = parser.parse_args()

    from agch import config as cfg
    from agch.cli.common import parse_pairs
    from agch.data import open_dataset
    from agch.paths import default_dataset
    from agch.tracking import Tracker
    from agch.train import train

    fixed = {**NETWORKS, **parse_pairs(args.overrides, "--set"), "eval_every": 1}
    deltas = [round(0.01 * 3 ** i, 6) for i in range(args.trials)]
    dataset = (args.data or default_dataset()).resolve()
    cpus = os.cpu_count() or 1

    base = cfg.apply(cfg.preset("paper"), {**fixed, "epochs": args.epochs})
    started = time.perf_counter()
    with open_dataset(dataset) as data:
        trial_seconds = [train(cfg.apply(base, {"delta": d}), data, device="cpu").seconds for d in deltas]
    loop = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as home:
        space = Path(home) / "bench.yaml"
        space.write_text(yaml.safe_dump({
            "preset": "paper", "fixed": fixed, "parameters": {"delta": {"type": "categorical", "choices": deltas}},
            "sampler": {"name": "grid", "seed": 0}, "scheduler": {"name": "none", "epochs": args.epochs},
            "trials": args.trials, "concurrency": 1, "resources": {"cpus": cpus}}))
        command = [sys.executable, "-m", "agch.cli.search", "run", str(space), "--data", str(dataset),
                   "--name", "bench", "--device", "cpu"]
        started, started_ms = time.perf_counter(), time.time() * 1000
        subprocess.run(command, check=True, env={**os.environ, "AGCH_HOME": home}, stdout=subprocess.DEVNULL)
        searched = time.perf_counter() - started
        runs = Tracker(f"sqlite:///{home}/mlflow.db", "agch-search").client.search_runs(
            [Tracker(f"sqlite:///{home}/mlflow.db", "agch-search").experiment_id], "tags.`agch.trial_id` != ''")
        inside = sum(r.data.metrics["train_seconds"] for r in runs)
        first_trial = (min(r.info.start_time for r in runs) - started_ms) / 1000

    print(f"dataset {dataset.name}, {args.trials} trials x {args.epochs} epochs, {cpus} CPU threads, "
          f"mean trial {sum(trial_seconds) / len(trial_seconds):.1f} s (train() alone)")
    print(f"plain loop:  {loop:.1f} s ({sum(trial_seconds):.1f} s inside train())")
    print(f"agch-search: {searched:.1f} s (Ray start-up, MLflow, Optuna, checkpoints included): "
          f"{inside:.1f} s inside train(), first trial's run opened after {first_trial:.1f} s")
    print(f"ratio search / loop: {searched / loop:.3f}")


if __name__ == "__main__":
    main()

"""Overhead of agch-search: N trials through the full service vs the same training work in a plain loop.

Both sides are timed from their command's start to its exit, each a fresh Python process. The search side is the
real command (a subprocess: Ray start-up, MLflow and Optuna stores, checkpoints, the console, plots) over a grid of
N δ values (0.01 to 10, log-spaced), one trial at a time with every core, every trial trained to its budget (no
stop at collapsed codes). A search also trains its chosen settings once more and scores them on the test queries,
so the loop does the same: a subprocess (this file with --loop) imports the trainer, opens the dataset once, calls
agch.method.train.train for the N configs, then once more for the best of them with eval_split=test, without tracking.
What a search after a home's first finds in place is made before the timing starts: the random/CCA+ITQ references
(cached per dataset, agch.method.baselines) and the MLflow and Optuna stores' tables.

    python bench/bench_search.py --trials 8 --epochs 6             # trials of ~30 s on 2 cores
    python bench/bench_search.py --data tiny.h5 --set text_hidden=64 --set gcn_hidden=64

The loop runs before the search and again after it, and the ratio is taken against their mean: this machine's
speed drifts by tens of percent over minutes, and a loop on one side only puts that drift into the ratio.

Prints both wall times and their ratio (search / loop), and splits the search's time outside train() into the
fixed start-up (command start to the first trial's MLflow run), the cost per trial (a trial run's wall time minus
its train() time), the gap before the test run (a second Tune run) and the finish (test run's end to exit); and the
time inside train() into the epochs' training (MLflow's epoch_seconds) and the rest (set-up, evaluations, reporting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

NETWORKS = {"text_hidden": 512, "gcn_hidden": 512}
"""The shipped spaces' CPU-sized networks (search_spaces/*.yaml)."""
OBJECTIVE = "map50_mean"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="N: trials (and loop iterations)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the bundled synthetic one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config override on top of {NETWORKS}")
    parser.add_argument("--no-loop-after", dest="loop_after", action="store_false",
                        help="run the plain loop only before the search, not before and after it (the ratio is "
                             "then taken against one loop, and a drift of the machine's speed goes into it)")
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)  # the plain loop's own process
    args = parser.parse_args()

    from agch import config as cfg
    from agch.cli.common import parse_pairs
    from agch.paths import default_dataset

    fixed = {**NETWORKS, **parse_pairs(args.overrides, "--set"), "eval_every": 1}
    # δ from 0.01 to 10, evenly on a log scale: every trial trains to its budget on both sides (the search's
    # trials do not stop at collapsed codes here, as the loop's do not)
    deltas = [round(0.01 * 1000 ** (i / max(args.trials - 1, 1)), 6) for i in range(args.trials)]
    dataset = (args.data or default_dataset()).resolve()
    cpus = os.cpu_count() or 1
    base = cfg.apply(cfg.preset("paper"), {**fixed, **cfg.SELECTION_DEFAULTS, "epochs": args.epochs})

    def plain_loop() -> tuple[float, dict]:
        """Wall time of the loop's own process (start to exit) and what it measured (see run_loop())."""
        started = time.perf_counter()
        command = [sys.executable, __file__, "--loop", "--trials", str(args.trials), "--epochs", str(args.epochs),
                   "--data", str(dataset), *(f"--set={pair}" for pair in args.overrides)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=environment)
        return time.perf_counter() - started, json.loads(done.stdout.splitlines()[-1])

    if args.loop:
        print(json.dumps(run_loop(base, deltas, dataset)))
        return
    from agch.method.baselines import reference_scores
    from agch.data.dataset import open_dataset
    from agch.experiments.search import default_storage_url, open_storage
    from agch.runs.tracking import Tracker

    environment = dict(os.environ)
    loop_before, before = plain_loop()

    with tempfile.TemporaryDirectory() as home:
        os.environ["AGCH_HOME"] = home  # this process's reference cache and stores; the search gets it below
        with open_dataset(dataset) as data:
            reference_scores(base, data)  # cached in the search's home, as after a dataset's first search
        Tracker(f"sqlite:///{home}/mlflow.db", "agch-search")  # the stores' tables, as after a home's first search
        open_storage(default_storage_url())
        space = Path(home) / "bench.yaml"
        space.write_text(yaml.safe_dump({
            "preset": "paper", "fixed": fixed, "parameters": {"delta": {"type": "categorical", "choices": deltas}},
            "sampler": {"name": "grid", "seed": 0},
            "scheduler": {"name": "none", "epochs": args.epochs, "stop_on_collapse": False},
            "trials": args.trials, "concurrency": 1, "resources": {"cpus": cpus}}))
        command = [sys.executable, "-m", "agch.cli.search", "run", str(space), "--data", str(dataset),
                   "--name", "bench", "--device", "cpu"]
        started, started_ms = time.perf_counter(), time.time() * 1000
        subprocess.run(command, check=True, env={**environment, "AGCH_HOME": home}, stdout=subprocess.DEVNULL)
        searched = time.perf_counter() - started
        ended_ms = started_ms + searched * 1000
        tracker = Tracker(f"sqlite:///{home}/mlflow.db", "agch-search")
        runs = tracker.client.search_runs([tracker.experiment_id], "tags.`agch.trial_id` != ''",
                                          order_by=["attributes.start_time ASC"])
        trials = [r for r in runs if not r.data.tags.get("agch.group", "").endswith(".test")]
        tests = [r for r in runs if r.data.tags.get("agch.group", "").endswith(".test")]
        epochs = sum(m.value for r in runs for m in tracker.client.get_metric_history(r.info.run_id, "epoch_seconds"))
    loop_after, after = plain_loop() if args.loop_after else (loop_before, before)
    loop = (loop_before + loop_after) / 2

    def wall(run) -> float:
        return (run.info.end_time - run.info.start_time) / 1000

    inside = sum(r.data.metrics["train_seconds"] for r in runs)
    per_trial = [wall(r) - r.data.metrics["train_seconds"] for r in trials]
    print(f"dataset {dataset.name}, {args.trials} trials x {args.epochs} epochs + the test run, {cpus} CPU threads, "
          f"mean trial {before['mean_trial']:.1f} s (train() alone in the loop before); "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.loop_after:
        print(f"plain loop:  {loop:.1f} s, the mean of {loop_before:.1f} s before the search and {loop_after:.1f} s "
              f"after it ({before['inside']:.1f} and {after['inside']:.1f} s inside train())")
    else:
        print(f"plain loop:  {loop:.1f} s ({before['inside']:.1f} s inside train())")
    print(f"agch-search: {searched:.1f} s ({inside:.1f} s inside train(), {searched - inside:.1f} s outside)")
    print(f"  inside train(): the epochs' training {epochs:.1f} s "
          f"(loop: {before['epochs']:.1f} / {after['epochs']:.1f} s), "
          f"the rest (set-up, evaluations, reporting, checkpoints) {inside - epochs:.1f} s (loop: "
          f"{before['inside'] - before['epochs']:.1f} / {after['inside'] - after['epochs']:.1f} s)")
    print(f"  fixed start-up (command start to the first trial's run): "
          f"{(trials[0].info.start_time - started_ms) / 1000:.1f} s")
    print(f"  per trial (run wall minus train()): mean {sum(per_trial) / len(per_trial):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in per_trial)})")
    if tests:
        print(f"  gap before the test run (last trial's end to its start): "
              f"{(tests[0].info.start_time - trials[-1].info.end_time) / 1000:.1f} s; test run outside train(): "
              f"{wall(tests[0]) - tests[0].data.metrics['train_seconds']:.2f} s; finish (its end to exit): "
              f"{(ended_ms - tests[-1].info.end_time) / 1000:.1f} s")
    print(f"ratio search / loop: {searched / loop:.3f}" + (
        f" (against the loop before: {searched / loop_before:.3f}, after: {searched / loop_after:.3f})"
        if args.loop_after else ""))


def run_loop(base, deltas: list[float], dataset: Path) -> dict:
    """The plain loop: train() for each δ, then the best δ once more on the test queries. Returns the time inside
    train() and the epochs' training time (both summed over the N + 1 runs) and the mean trial's train() time."""
    from agch import config as cfg
    from agch.data.dataset import open_dataset
    from agch.method.train import train

    with open_dataset(dataset) as data:
        results = [train(cfg.apply(base, {"delta": d}), data, device="cpu") for d in deltas]
        best = max(zip(deltas, results), key=lambda pair: pair[1].metrics.get(OBJECTIVE, float("-inf")))[0]
        test = train(cfg.apply(base, {"delta": best, "eval_split": "test"}), data, device="cpu")
    trained = [*results, test]
    return {"inside": sum(r.seconds for r in trained), "epochs": sum(row["seconds"] for r in trained
                                                                   for row in r.history),
            "mean_trial": sum(r.seconds for r in results) / len(results)}


if __name__ == "__main__":
    main()

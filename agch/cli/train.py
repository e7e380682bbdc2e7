"""agch-train: one tracked training run from a preset plus overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agch.method.baselines import METHODS
from agch.cli.common import add_common_options, config_from_args, dataset_path, run_main
from agch.runs.names import Tag


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agch-train", description="Train AGCH once and log it to MLflow.",
        epilog="example: agch-train --preset paper --set delta=1.0 --fix alignment=on --seed 1")
    add_common_options(parser)
    parser.add_argument("--method", choices=METHODS, default="agch",
                        help="agch (default), or a reference scored the same way, which uses only bits, seed, topk "
                             "and eval_split of the config: cca-itq (CCA + ITQ) or plain-s (AGCH's S driving two MLP "
                             "encoders, no GCN or fusion: the plain-s preset)")
    parser.add_argument("--experiment", default="agch", help="MLflow experiment name (default agch)")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: preset-bits-seed)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (print only)")
    return parser


def describe(metrics: dict[str, float], protocol: dict, k: int) -> str:
    """The headline figures with their full protocol (docs/protocol.md)."""
    from agch.evaluation.protocol import describe_protocol

    return (f"mAP@{k}: I->T {metrics[f'map{k}_i2t']:.4f}  T->I {metrics[f'map{k}_t2i']:.4f} | "
            f"mAP@ALL: I->T {metrics['mapall_i2t']:.4f}  T->I {metrics['mapall_t2i']:.4f}  "
            f"[{describe_protocol(protocol)}]")


def run(argv: list[str] | None) -> int:
    from agch.config import to_flat
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of
    from agch.runs.tracking import Tracker
    from agch.runs.record import run_tags
    from agch.method.device import resolve_device

    args = build_parser().parse_args(argv)
    preset, config = config_from_args(args)
    if args.method == "plain-s":
        from agch.method.baselines import plain_s_config

        config = plain_s_config(config)  # then trained and logged like any AGCH run
    device = str(resolve_device(args.device))  # every user error is found before anything is recorded
    with open_dataset(dataset_path(args)) as data:
        tracker = None if args.no_tracking else Tracker(args.tracking_uri, args.experiment)
        run_id = None
        if tracker is not None:
            label = preset if args.method == "agch" else args.method
            name = args.run_name or f"{label}-{config.bits}bit-seed{config.seed}"
            run_id = tracker.start_run(name, tags={**run_tags(config, data), Tag.METHOD: args.method})
            tracker.log_params(run_id, to_flat(config))
        print(f"agch-train: mAP@{config.topk}(mean) below = mean of I->T and T->I, "
              f"{describe_protocol(protocol_of(config, data))}", file=sys.stderr)
        if args.method == "cca-itq":
            from agch.method.baselines import cca_itq

            result = cca_itq(config, data)
            return _report(result, config, tracker, run_id, args.experiment)
        result = _train_with_progress(config, data, device, tracker, run_id)
        return _report(result, config, tracker, run_id, args.experiment)


def _train_with_progress(config: Any, data: Any, device: str, tracker: Any, run_id: str | None) -> Any:
    """train() with a progress bar and each epoch's losses and metrics logged; the run KILLED if it is stopped."""
    from tqdm import tqdm

    from agch.method.train import train

    bar = tqdm(total=config.epochs, desc="agch-train", unit="epoch", file=sys.stderr)
    last_map = "n/a"

    def on_epoch(report: Any) -> None:
        nonlocal last_map
        if report.metrics:
            last_map = f"{report.metrics[f'map{config.topk}_mean']:.4f}"
        bar.set_postfix_str(f"loss {report.losses['total']:.4g}  mAP@{config.topk}(mean) {last_map}")
        bar.update(1)
        if tracker is not None:
            tracker.log_metrics(run_id, {f"loss_{k}": v for k, v in report.losses.items()}, report.epoch)
            if report.metrics:
                tracker.log_metrics(run_id, report.metrics, report.epoch)

    try:
        return train(config, data, on_epoch, device=device)
    except BaseException:
        if tracker is not None:
            tracker.end_run(run_id, "KILLED")
        raise
    finally:
        bar.close()


def _report(result, config, tracker, run_id: str | None, experiment: str) -> int:
    """Record the result (when tracking), print the headline figures with their protocol; the exit status."""
    from agch.runs.record import log_result

    if tracker is not None:
        log_result(tracker, run_id, config, result)
        tracker.end_run(run_id, "FINISHED" if result.status == "finished" else "FAILED")
    if result.status != "finished":
        print(f"agch-train: run failed: {result.reason}", file=sys.stderr)
    if result.metrics.get(f"map{config.topk}_i2t") is not None:
        print(describe(result.metrics, result.protocol, config.topk))
    if result.collapsed:
        print("agch-train: warning: codes collapsed (fewer than 5% unique codes)", file=sys.stderr)
    if tracker is not None:
        print(f"logged to MLflow run {run_id} at {tracker.uri} (experiment {experiment})")
    return 0 if result.status == "finished" else 1


def main(argv: list[str] | None = None) -> int:
    return run_main("agch-train", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

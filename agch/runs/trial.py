"""What one Ray Tune trial runs: one trainer call, one nested MLflow run, a report per epoch (the shared context:
agch.runs.context).

Why the MLflow run of a trial is looked up by tags before one is created: a trial that Tune restarts (after a
driver crash, or from scratch when it had no checkpoint yet) must continue its own run, never open a second one.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.runs.context import (FINAL, RUN_ID, SETTINGS, TRIAL_NUMBER, RunContext, TrialFailed, checkpoint_period,
                               end_trial_run, run_name, settings_key, trial_config, trial_slot)
from agch.runs.tracking import RetryingTracker
from agch.runs.names import Tag


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: train one config, log it to its own nested MLflow run, report every epoch."""
    import ray
    import torch
    from ray import tune

    from agch.data.dataset import open_dataset
    from agch.method.train import train
    from agch.runs.record import log_result

    context = RunContext(**ctx)
    config = trial_config(context, params)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))  # concurrent trials must not oversubscribe the cores
    tracker = RetryingTracker(context.tracking_uri, context.experiment)
    checkpoint = tune.get_checkpoint()
    resume = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    with open_dataset(context.dataset) as data:
        run_id = _open_run(tracker, context, params, config, data)
        if run_id is None:
            return  # ended before the driver went down: replayed, never trained twice
        try:
            result = train(config, data, _Reporter(tracker, run_id, context, config), device=context.device,
                           resume=resume)
        except Exception as err:
            end_trial_run(tracker, run_id, "failed", f"{type(err).__name__}: {err}")
            raise TrialFailed(f"{type(err).__name__}: {err}") from err
        log_result(tracker, run_id, config, result)
        if result.status != "finished":
            end_trial_run(tracker, run_id, "failed", result.reason)
            raise TrialFailed(result.reason)
        # collapsed codes are a result (tagged agch.collapsed): a sampler must learn where they happen
        end_trial_run(tracker, run_id, "finished", result.reason)
    tune.report({**result.metrics, "epoch": result.epochs_run, RUN_ID: run_id, FINAL: 1})


def _open_run(tracker: RetryingTracker, context: RunContext, params: dict[str, Any], config: cfg.Config,
              data: Any) -> str | None:
    """The trial's MLflow run, found by its slot and continued (a retry, a restored trial, or one in a lost
    trial's place) or created; None when the slot's run had already ended, which is then replayed to Tune."""
    import ray
    from ray import tune

    from agch.runs.record import run_tags

    trial_id, slot = tune.get_context().get_trial_id(), trial_slot(context, params)
    recorded = tracker.find_trial_run(context.group, slot)
    if recorded is not None and recorded.info.status in ("FINISHED", "FAILED"):
        tracker.set_tags(recorded.info.run_id, {Tag.TRIAL_ID: trial_id})
        _replay(recorded)
        return None
    attempt = 1
    if recorded is not None:
        run_id = recorded.info.run_id
        attempt = int(recorded.data.tags.get(Tag.ATTEMPTS, "1")) + 1
        tracker.reopen(run_id)
    else:
        name = run_name(context, params, config)
        label, described = context.name or context.group, run_tags(config, data)
        tags = {**described, Tag.GROUP: context.group, Tag.SLOT: slot, Tag.NAME: label,
                Tag.ROLE: context.role, Tag.SEED: str(config.seed),
                "mlflow.note.content": f"{context.kind or 'trial'} {label}, {name}: every mAP is "
                                       f"{described['agch.protocol']}",
                Tag.TRIAL_ID: trial_id, Tag.TRIAL_PARAMS: json.dumps(params, sort_keys=True, default=str)}
        if TRIAL_NUMBER in params:
            tags[Tag.TRIAL_NUMBER] = str(params[TRIAL_NUMBER])
        if SETTINGS in params:
            tags[Tag.ARM] = context.arm_labels.get(settings_key(params[SETTINGS]), "")
        run_id = tracker.start_run(name, tags=tags, parent=context.parent_run_id)
        tracker.log_params(run_id, cfg.to_flat(config))
    tracker.set_tags(run_id, {Tag.STATUS: "running", Tag.REASON: "", Tag.ATTEMPTS: attempt,
                              Tag.TRIAL_ID: trial_id, "ray.node_id": ray.get_runtime_context().get_node_id()})
    return run_id


class _Reporter:
    """The trainer's epoch callback in a trial: one MLflow write per epoch, one Tune report per epoch but the
    last (reported after the run is complete), a checkpoint at most every checkpoint_period() seconds, and the stop
    at a collapsed evaluation when the search asks for it."""

    def __init__(self, tracker: RetryingTracker, run_id: str, context: RunContext, config: cfg.Config):
        self.tracker, self.run_id, self.context, self.config = tracker, run_id, context, config
        self.period = checkpoint_period()
        self.next_checkpoint = time.monotonic() + self.period  # the first after that much training

    def __call__(self, report: Any) -> str | None:
        import torch
        from ray import tune

        # the losses, the epoch's time and, but on the last epoch, the metrics (log_result records the final ones)
        last = report.epoch >= self.config.epochs
        self.tracker.log_metrics(self.run_id, {**{f"loss_{k}": v for k, v in report.losses.items()},
                                               "epoch": report.epoch, "epoch_seconds": report.seconds,
                                               **({} if last else report.metrics or {})}, report.epoch)
        if last:
            return None  # the last epoch is reported after the run is complete (a scheduler may stop it at once)
        result = {"epoch": report.epoch, "loss": report.losses["total"], RUN_ID: self.run_id}
        if not report.metrics:
            tune.report(result)
            return None
        if self.context.stop_on_collapse and report.metrics.get("collapsed"):
            return f"stopped after epoch {report.epoch}: codes collapsed (fewer than 5% unique)"
        if time.monotonic() < self.next_checkpoint:
            tune.report({**result, **report.metrics})
            return None
        with tempfile.TemporaryDirectory() as folder:
            torch.save(report.state(), Path(folder) / "state.pt")
            tune.report({**result, **report.metrics}, checkpoint=tune.Checkpoint.from_directory(folder))
        self.next_checkpoint = time.monotonic() + self.period
        return None


def _replay(run: Any) -> None:
    """Report a run that already ended as the trial's result (finished), its last result without the final mark
    (stopped by the scheduler: the searcher records it stopped again) or its error (failed)."""
    from ray import tune

    if run.info.status == "FAILED":
        raise TrialFailed(run.data.tags.get(Tag.REASON) or "failed in an earlier session")
    stopped = run.data.tags.get(Tag.STATUS) == "stopped"
    epochs = int(run.data.metrics.get("epoch", 0)) if stopped else int(run.data.params.get("epochs", 0))
    tune.report({**run.data.metrics, "epoch": epochs, RUN_ID: run.info.run_id, **({} if stopped else {FINAL: 1})})

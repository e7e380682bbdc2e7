"""Inside a trial: what one Ray Tune trial runs (one trainer call, one nested MLflow run) and what it shares
with the driver (agch.runner): the RunContext, the param keys and how params become a config.

Why the MLflow run of a trial is looked up by tags before one is created: a trial that Tune restarts (after a
driver crash, or from scratch when it had no checkpoint yet) must continue its own run, never open a second one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.tracking import RetryingTracker

SEED_OFFSET = "seed_offset"
"""Param key of a repeated trial: it trains with seed base.seed + this (several seeds per suggestion)."""
SETTINGS = "settings"
"""Param key of a mapping of flat config keys an ablation grid sets together (one grid value per cell)."""
TRIAL_NUMBER = "trial_number"
"""Param key a search algorithm adds so that trials with equal settings stay distinct (agch-search: the Optuna trial
number). Like SEED_OFFSET it is not a config key."""
FINAL = "agch_final"
"""Result key set (to 1) only on a trial's last report, after its MLflow run is complete."""
@dataclass(frozen=True)
class RunContext:
    """What every trial of one search or ablation shares; JSON-able, because trials run in other processes."""

    dataset: str
    """absolute path of the dataset file (trials run in their own working directories)."""
    tracking_uri: str
    """absolute MLflow tracking URI."""
    experiment: str
    """MLflow experiment name."""
    parent_run_id: str
    """the MLflow parent run of this search or ablation."""
    device: str
    """auto / cpu / cuda."""
    base: dict
    """flat config (agch.config.to_flat) every trial starts from."""
    group: str
    """the search or ablation name (tag agch.group on every child run)."""
    stop_on_collapse: bool = False
    """end a trial at its first evaluation whose codes collapsed, with that evaluation as its result (agch-search;
    an ablation trains every run to its budget)."""


class TrialFailed(Exception):
    """Raised by a trial whose training failed (non-finite loss, collapse, exception); Tune records it as errored."""


def trial_config(ctx: RunContext, params: dict[str, Any]) -> cfg.Config:
    """ctx.base plus the trial's params (config keys, 'fixes.<name>', SETTINGS, SEED_OFFSET for repeated trials,
    TRIAL_NUMBER)."""
    params = dict(params)
    params.pop(TRIAL_NUMBER, None)
    params.update(params.pop(SETTINGS, {}))
    offset = int(params.pop(SEED_OFFSET, 0))
    config = cfg.apply(cfg.Config(), {**ctx.base, **params}, where="trial params")
    return dataclasses.replace(config, seed=config.seed + offset) if offset else config


def trial_slot(ctx: RunContext, params: dict[str, Any]) -> str:
    """The trial's place in its search or ablation, tagged agch.slot on its MLflow run.

    A Tune retry keeps its trial id, but a driver killed before it saved a trial it had just started loses that
    id: the restored driver starts a new trial in its place, with the same params (agch-search hands the same
    Optuna trial out again). Both find the place's one run by this key, so no place ever gets a second run.
    """
    key = json.dumps([ctx.parent_run_id, ctx.group, params], sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def end_trial_run(tracker: RetryingTracker, run_id: str, status: str, reason: str | None) -> None:
    """Tag the trial's state and reason and close its MLflow run accordingly."""
    tracker.set_tags(run_id, {"agch.status": status, "agch.reason": reason or ""})
    mlflow_status = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
    tracker.end_run(run_id, mlflow_status)



def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: train one config, log it to its own nested MLflow run, report every epoch."""
    import ray
    import torch
    from ray import tune

    from agch.data import open_dataset
    from agch.tracking import log_result, run_tags
    from agch.train import train

    context = RunContext(**ctx)
    trial_id = tune.get_context().get_trial_id()
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
        slot = trial_slot(context, params)
        recorded = tracker.find_trial_run(context.group, slot)
        if recorded is not None and recorded.info.status in ("FINISHED", "FAILED"):
            tracker.set_tags(recorded.info.run_id, {"agch.trial_id": trial_id})
            _replay(recorded)  # ended before the driver went down: never train it twice
            return
        attempt = 1
        if recorded is not None:  # a retry, a restored trial, or one in a lost trial's place: continue that run
            run_id = recorded.info.run_id
            attempt = int(recorded.data.tags.get("agch.attempts", "1")) + 1
            tracker.reopen(run_id)
        else:
            tags = {**run_tags(config, data), "agch.group": context.group, "agch.slot": slot,
                    "agch.trial_id": trial_id, "agch.trial_params": json.dumps(params, sort_keys=True, default=str)}
            run_id = tracker.start_run(f"{context.group}/{trial_id}", tags=tags, parent=context.parent_run_id)
            tracker.log_params(run_id, cfg.to_flat(config))
        tracker.set_tags(run_id, {"agch.status": "running", "agch.reason": "", "agch.attempts": attempt,
                                  "agch.trial_id": trial_id,
                                  "ray.node_id": ray.get_runtime_context().get_node_id()})

        def on_epoch(report: Any) -> str | None:
            tracker.log_metrics(run_id, {f"loss_{k}": v for k, v in report.losses.items()}, report.epoch)
            tracker.log_metrics(run_id, {"epoch": report.epoch, "epoch_seconds": report.seconds}, report.epoch)
            if report.epoch >= config.epochs:
                return None  # the last epoch is reported after the run is complete (a scheduler may stop it at once)
            result = {"epoch": report.epoch, "loss": report.losses["total"]}
            if not report.metrics:
                tune.report(result)
                return None
            tracker.log_metrics(run_id, report.metrics, report.epoch)
            if context.stop_on_collapse and report.metrics.get("collapsed"):
                return f"stopped after epoch {report.epoch}: codes collapsed (fewer than 5% unique)"
            with tempfile.TemporaryDirectory() as folder:
                torch.save(report.state(), Path(folder) / "state.pt")
                tune.report({**result, **report.metrics}, checkpoint=tune.Checkpoint.from_directory(folder))
            return None

        try:
            result = train(config, data, on_epoch, device=context.device, resume=resume)
        except Exception as err:
            end_trial_run(tracker, run_id, "failed", f"{type(err).__name__}: {err}")
            raise TrialFailed(f"{type(err).__name__}: {err}") from err
        log_result(tracker, run_id, config, result)
        if result.status != "finished":
            end_trial_run(tracker, run_id, "failed", result.reason)
            raise TrialFailed(result.reason)
        # collapsed codes are a result (tagged agch.collapsed): a sampler must learn where they happen
        end_trial_run(tracker, run_id, "finished", result.reason)
    tune.report({**result.metrics, "epoch": result.epochs_run, FINAL: 1})


def _replay(run: Any) -> None:
    """Report a run that already ended as the trial's result (finished) or error (failed)."""
    from ray import tune

    if run.info.status == "FAILED":
        raise TrialFailed(run.data.tags.get("agch.reason") or "failed in an earlier session")
    epochs = int(run.data.params.get("epochs", 0))
    tune.report({**run.data.metrics, "epoch": epochs, FINAL: 1})

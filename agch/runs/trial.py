"""Inside a trial: what one Ray Tune trial runs (one trainer call, one nested MLflow run) and what it shares
with the driver (agch.runs.driver): the RunContext, the param keys and how params become a config.

Why the MLflow run of a trial is looked up by tags before one is created: a trial that Tune restarts (after a
driver crash, or from scratch when it had no checkpoint yet) must continue its own run, never open a second one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.errors import UserError
from agch.runs.tracking import RetryingTracker

SEED_OFFSET = "seed_offset"
"""Param key of a repeated trial: it trains with seed base.seed + this (several seeds per suggestion)."""
SETTINGS = "settings"
"""Param key of a mapping of flat config keys an ablation grid sets together (one grid value per cell)."""
TRIAL_NUMBER = "trial_number"
"""Param key a search algorithm adds so that trials with equal settings stay distinct (agch-search: the Optuna trial
number). Like SEED_OFFSET it is not a config key."""
FINAL = "agch_final"
"""Result key set (to 1) only on a trial's last report, after its MLflow run is complete."""
RUN_ID = "agch_run_id"
"""Result key of every report: the trial's MLflow run id (the searcher records it on the Optuna trial)."""
CHECKPOINT_ENV = "AGCH_CHECKPOINT_EVERY_S"
"""Environment variable: seconds between a trial's checkpoints (checkpoint_period)."""
SYMBOLS = {"delta": "δ", "gamma_v": "γv", "gamma_t": "γt", "lam": "λ", "alpha": "α", "beta": "β", "rho": "ρ"}
"""The paper's symbols, for run names, in the order run names give them (other keys follow alphabetically)."""


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
    """the Tune experiment's group (tag agch.group on every child run): the search's name, or one grid of an
    ablation."""
    name: str = ""
    """what the user named: the search or the ablation (tag agch.name on the parent and every child run)."""
    kind: str = ""
    """'search' or 'ablation'."""
    role: str = "trial"
    """tag agch.role of the runs: 'trial' (one of the search's or ablation's trials, what the UI link lists) or
    'test' (a search's chosen settings scored once on the test queries)."""
    label: str = ""
    """with role 'test': what was chosen, e.g. 'chosen settings t2' (the run's name: 'test: chosen settings t2 ...')."""
    arm_labels: dict = field(default_factory=dict)
    """an ablation's arm label per cell settings (key: settings_key), for run names and the agch.arm tag."""
    stop_on_collapse: bool = False
    """end a trial at its first evaluation whose codes collapsed, with that evaluation as its result (agch-search;
    an ablation trains every run to its budget)."""


def checkpoint_period() -> float:
    """How often a trial checkpoints its trainer at an evaluation, at most: $AGCH_CHECKPOINT_EVERY_S seconds of its
    wall time (default 30; 0: at every evaluation).

    A trial that Tune restarts redoes at most this much training, and every checkpoint costs a copy of the model and
    Adam state (docs/search.md). ASHA, the only scheduler, stops trials and never pauses them, so it needs none.
    """
    raw = os.environ.get(CHECKPOINT_ENV, "30")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise UserError(f"{CHECKPOINT_ENV} must be a number of seconds >= 0 (0: checkpoint at every evaluation), "
                        f"got {raw!r}")
    return seconds


def settings_key(settings: dict[str, Any]) -> str:
    """A cell's settings as one string (RunContext.arm_labels is keyed by it)."""
    return json.dumps(settings, sort_keys=True, default=str)


def run_name(ctx: RunContext, params: dict[str, Any], config: cfg.Config) -> str:
    """What varied, as the run's name: 't3 δ=0.034 γv=3.27 γt=0.82' (a search trial; then 's<seed>' when it is one
    of several seeds), 'test: chosen settings t3 δ=0.034 γv=3.27 γt=0.82' (a search's test run) or
    'paper[+alignment] s0' (an ablation arm and seed)."""
    params = dict(params)
    number, offset, settings = (params.pop(k, None) for k in (TRIAL_NUMBER, SEED_OFFSET, SETTINGS))
    params.pop("seed", None)
    parts = [f"test: {ctx.label}"] if ctx.role == "test" and ctx.label else []
    parts += [f"t{number}"] if number is not None else []
    if settings is not None:
        parts.append(ctx.arm_labels.get(settings_key(settings)) or settings_key(settings))
    order = list(SYMBOLS)
    keys = sorted(params, key=lambda k: (order.index(k) if k in order else len(order), k))
    parts += [f"{SYMBOLS.get(k, k)}={params[k]:.3g}" if isinstance(params[k], float)
              else f"{SYMBOLS.get(k, k)}={params[k]}" for k in keys]
    if settings is not None or offset:
        parts.append(f"s{config.seed}")
    return " ".join(parts) or ctx.group


class TrialFailed(Exception):
    """Raised by a trial whose training failed (non-finite loss, exception); Tune records it as errored. Collapsed
    codes are a result, not a failure."""


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


MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
"""The MLflow status a trial's run ends with, by its agch.status: a trial the scheduler stopped early ran as asked
(its result is the value that stopped it), so it is FINISHED, not KILLED or FAILED; only an interrupted trial, which
a resume continues, is KILLED."""


def end_trial_run(tracker: RetryingTracker, run_id: str, status: str, reason: str | None) -> None:
    """Tag the trial's state and reason and close its MLflow run accordingly (MLFLOW_STATUS)."""
    tracker.set_tags(run_id, {"agch.status": status, "agch.reason": reason or ""})
    tracker.end_run(run_id, MLFLOW_STATUS.get(status, "KILLED"))


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: train one config, log it to its own nested MLflow run, report every epoch."""
    import ray
    import torch
    from ray import tune

    from agch.data.dataset import open_dataset
    from agch.runs.tracking import log_result, run_tags
    from agch.method.train import train

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
            name = run_name(context, params, config)
            label, described = context.name or context.group, run_tags(config, data)
            tags = {**described, "agch.group": context.group, "agch.slot": slot, "agch.name": label,
                    "agch.role": context.role, "agch.seed": str(config.seed),
                    "mlflow.note.content": f"{context.kind or 'trial'} {label}, {name}: every mAP is {described['agch.protocol']}",
                    "agch.trial_id": trial_id, "agch.trial_params": json.dumps(params, sort_keys=True, default=str)}
            if TRIAL_NUMBER in params:
                tags["agch.trial_number"] = str(params[TRIAL_NUMBER])
            if SETTINGS in params:
                tags["agch.arm"] = context.arm_labels.get(settings_key(params[SETTINGS]), "")
            run_id = tracker.start_run(name, tags=tags, parent=context.parent_run_id)
            tracker.log_params(run_id, cfg.to_flat(config))
        tracker.set_tags(run_id, {"agch.status": "running", "agch.reason": "", "agch.attempts": attempt,
                                  "agch.trial_id": trial_id,
                                  "ray.node_id": ray.get_runtime_context().get_node_id()})

        period = checkpoint_period()
        next_checkpoint = time.monotonic() + period  # the first after that much training

        def on_epoch(report: Any) -> str | None:
            nonlocal next_checkpoint
            # one write per epoch: the losses, the epoch's time and, on the last epoch, not yet the metrics
            # (log_result records the final ones with the run)
            last = report.epoch >= config.epochs
            tracker.log_metrics(run_id, {**{f"loss_{k}": v for k, v in report.losses.items()}, "epoch": report.epoch,
                                         "epoch_seconds": report.seconds, **({} if last else report.metrics or {})},
                                report.epoch)
            if last:
                return None  # the last epoch is reported after the run is complete (a scheduler may stop it at once)
            result = {"epoch": report.epoch, "loss": report.losses["total"], RUN_ID: run_id}
            if not report.metrics:
                tune.report(result)
                return None
            if context.stop_on_collapse and report.metrics.get("collapsed"):
                return f"stopped after epoch {report.epoch}: codes collapsed (fewer than 5% unique)"
            if time.monotonic() < next_checkpoint:
                tune.report({**result, **report.metrics})
                return None
            with tempfile.TemporaryDirectory() as folder:
                torch.save(report.state(), Path(folder) / "state.pt")
                tune.report({**result, **report.metrics}, checkpoint=tune.Checkpoint.from_directory(folder))
            next_checkpoint = time.monotonic() + period
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
    tune.report({**result.metrics, "epoch": result.epochs_run, RUN_ID: run_id, FINAL: 1})


def _replay(run: Any) -> None:
    """Report a run that already ended as the trial's result (finished), its last result without the final mark
    (stopped by the scheduler: the searcher records it stopped again) or its error (failed)."""
    from ray import tune

    if run.info.status == "FAILED":
        raise TrialFailed(run.data.tags.get("agch.reason") or "failed in an earlier session")
    stopped = run.data.tags.get("agch.status") == "stopped"
    epochs = int(run.data.metrics.get("epoch", 0)) if stopped else int(run.data.params.get("epochs", 0))
    tune.report({**run.data.metrics, "epoch": epochs, RUN_ID: run.info.run_id, **({} if stopped else {FINAL: 1})})

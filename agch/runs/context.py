"""What a search's or an ablation's driver and its trials share: the RunContext every trial gets, the param and
result keys, how a trial's params become its config, its name and place (slot), its checkpoint period, and how a
trial's MLflow run ends. The driver is agch.runs.driver, what a trial runs is agch.runs.trial."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from agch import config as cfg
from agch.errors import UserError
from agch.runs.names import Tag

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
    config = cfg.layered("paper", [cfg.Layer(ctx.base, f"{ctx.kind or 'the'} {ctx.name or ctx.group}'s settings"),
                                   cfg.Layer(params, "trial params")])
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


def end_trial_run(tracker: Any, run_id: str, status: str, reason: str | None) -> None:
    """Tag the trial's state and reason and close its MLflow run accordingly (MLFLOW_STATUS)."""
    tracker.set_tags(run_id, {Tag.STATUS: status, Tag.REASON: reason or ""})
    tracker.end_run(run_id, MLFLOW_STATUS.get(status, "KILLED"))

"""The Ray Tune runner shared by agch-search and agch-ablate: one Tune trial = one trainer call = one nested MLflow run.

Thin by design: Tune schedules and restores trials, the caller's search algorithm or grid picks their params,
`agch.train.train` trains, `agch.tracking` records. Nothing here knows about Optuna or ablation designs.

Why the MLflow run of a trial is looked up by tags before one is created: a trial that Tune restarts (after a
driver crash, or from scratch when it had no checkpoint yet) must continue its own run, never open a second one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from agch import config as cfg
from agch.errors import UserError

SEED_OFFSET = "seed_offset"
"""Param key of a repeated trial: it trains with seed base.seed + this (several seeds per suggestion)."""
SETTINGS = "settings"
"""Param key of a mapping of flat config keys an ablation grid sets together (one grid value per cell)."""
TRIAL_NUMBER = "trial_number"
"""Param key a search algorithm adds so that trials with equal settings stay distinct (agch-search: the Optuna trial
number). Like SEED_OFFSET it is not a config key."""
FINAL = "agch_final"
"""Result key set (to 1) only on a trial's last report, after its MLflow run is complete."""
STATES = ("finished", "failed", "stopped", "interrupted")
"""TrialOutcome.status: stopped = early-stopped by the scheduler; interrupted = the search ended first (Ctrl-C, time
budget, a killed driver): a resume continues it. A run tagged 'lost' belongs to no trial any more (see mark_lost)."""
# Tune saves its experiment state (which trials finished, the searcher) at most this often. Short, so that a driver
# killed right after a trial finished still knows on resume that it finished.
EXPERIMENT_SAVE_PERIOD_S = "1"

MAX_RETRIES = 2
"""On a cluster (--ray-address), times Tune restarts a trial whose worker died (node lost, OOM), from its last
checkpoint and into its own MLflow run; a trial that failed on its own (NaN loss, collapse) replays its recorded
failure at once instead. A local Ray loses no nodes, so there trials are not retried: a retry racing a Ctrl-C
shutdown could open a second run for the same trial."""


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


@dataclass
class TrialOutcome:
    """How one trial ended, read back from its MLflow run."""

    trial_id: str
    params: dict
    status: str
    """one of STATES."""
    reason: str | None
    metrics: dict = field(default_factory=dict)
    run_id: str | None = None
    epochs: int = 0


@dataclass
class _Session:
    """What the driver-side callback shares with run_trials while one group's trials run."""

    on_result: Callable | None = None
    on_complete: Callable | None = None
    trials: dict[str, tuple[str, dict, str | None]] = field(default_factory=dict)
    """Tune's view at the end: trial id -> (Tune status, params, the error that ended an ERROR trial)."""


_SESSIONS: dict[str, _Session] = {}
"""Live sessions by group. Tune pickles RunConfig (callbacks included) into its experiment folder and uses that copy
after Tuner.restore, so the console and this bookkeeping cannot be fields of the callback object itself."""


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


# --------------------------------------------------------------------------------------------------- MLflow access
TRACKING_WAIT_S = "AGCH_TRACKING_WAIT_S"
"""Environment variable: how long (seconds, default 600) a trial or the driver waits for a tracking server that
stopped answering, beyond MLflow's own client retries, before its call fails. Trials get the driver's value."""


def tracking_wait_s() -> float:
    value = os.environ.get(TRACKING_WAIT_S, "600")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise UserError(f"{TRACKING_WAIT_S} must be a number of seconds, got {value!r}") from None


class RetryingTracker:
    """agch.tracking.Tracker whose calls retry with backoff while an SQLite store is locked by another trial, and
    wait (up to tracking_wait_s) while a tracking server does not answer."""

    ATTEMPTS = 10
    """tries while SQLite says the database is locked."""

    def __init__(self, uri: str, experiment: str, *, wait: bool = True):
        """wait=False: fail at once when the server does not answer (a check before anything starts)."""
        from agch.tracking import Tracker, resolve_uri

        self.uri, self.wait = resolve_uri(uri), wait
        self._tracker = self._call(Tracker, self.uri, experiment)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tracker, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._call(value, *args, **kwargs)

    def _call(self, call: Callable, *args: Any, **kwargs: Any) -> Any:
        from agch.tracking import unreachable

        locked, deadline = 0, None
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as err:  # MLflow wraps SQLAlchemy's OperationalError in several exception types
                if "locked" in str(err) and locked < self.ATTEMPTS - 1:
                    time.sleep(min(0.05 * 2 ** locked, 2.0) * (1 + random.random()))
                    locked += 1
                    continue
                if not self.wait or unreachable(self.uri) is None:
                    raise
                deadline = deadline or time.monotonic() + tracking_wait_s()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(2.0)

    def reopen(self, run_id: str) -> None:
        """Set a run that an earlier session left KILLED (or RUNNING) back to RUNNING."""
        self._call(self._tracker.client.update_run, run_id, status="RUNNING")

    def find_trial_run(self, group: str, slot: str) -> Any | None:
        """The MLflow run of the trial at `slot` (see trial_slot) in `group`, if one was started."""
        runs = self._call(self._tracker.client.search_runs, [self._tracker.experiment_id],
                          f"tags.`agch.group` = '{group}' and tags.`agch.slot` = '{slot}'", max_results=1)
        return runs[0] if runs else None

    def group_runs(self, group: str) -> list[Any]:
        """Every child run of `group`, oldest first."""
        return self._call(self._tracker.client.search_runs, [self._tracker.experiment_id],
                          f"tags.`agch.group` = '{group}' and tags.`agch.trial_id` != ''", max_results=50000,
                          order_by=["attributes.start_time ASC"])


def end_trial_run(tracker: RetryingTracker, run_id: str, status: str, reason: str | None) -> None:
    """Tag the trial's state and reason and close its MLflow run accordingly."""
    tracker.set_tags(run_id, {"agch.status": status, "agch.reason": reason or ""})
    mlflow_status = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
    tracker.end_run(run_id, mlflow_status)


# --------------------------------------------------------------------------------------------------- the trial
def _trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
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

        def on_epoch(report: Any) -> None:
            tracker.log_metrics(run_id, {f"loss_{k}": v for k, v in report.losses.items()}, report.epoch)
            tracker.log_metrics(run_id, {"epoch": report.epoch, "epoch_seconds": report.seconds}, report.epoch)
            if report.epoch >= config.epochs:
                return  # the last epoch is reported after the run is complete (a scheduler may stop it at once)
            result = {"epoch": report.epoch, "loss": report.losses["total"]}
            if not report.metrics:
                tune.report(result)
                return
            tracker.log_metrics(run_id, report.metrics, report.epoch)
            with tempfile.TemporaryDirectory() as folder:
                torch.save(report.state(), Path(folder) / "state.pt")
                tune.report({**result, **report.metrics}, checkpoint=tune.Checkpoint.from_directory(folder))

        try:
            result = train(config, data, on_epoch, device=context.device, resume=resume)
        except Exception as err:
            end_trial_run(tracker, run_id, "failed", f"{type(err).__name__}: {err}")
            raise TrialFailed(f"{type(err).__name__}: {err}") from err
        log_result(tracker, run_id, config, result)
        if result.status != "finished" or result.collapsed:
            reason = result.reason or "codes collapsed (fewer than 5% unique codes)"
            end_trial_run(tracker, run_id, "failed", reason)
            raise TrialFailed(reason)
        end_trial_run(tracker, run_id, "finished", None)
    tune.report({**result.metrics, "epoch": result.epochs_run, FINAL: 1})


def _replay(run: Any) -> None:
    """Report a run that already ended as the trial's result (finished) or error (failed)."""
    from ray import tune

    if run.info.status == "FAILED":
        raise TrialFailed(run.data.tags.get("agch.reason") or "failed in an earlier session")
    epochs = int(run.data.params.get("epochs", 0))
    tune.report({**run.data.metrics, "epoch": epochs, FINAL: 1})


# --------------------------------------------------------------------------------------------------- the driver
def start_ray(address: str | None = None, resources: dict[str, float] | None = None, *, verbose: bool = False) -> bool:
    """Connect to `address` or start a quiet local Ray (once per process); check that a trial fits.

    Returns True when this call started Ray (the caller then owns `ray.shutdown()`). Raises UserError when the
    cluster cannot be reached or one trial asks for more CPUs or GPUs than the cluster has, before any trial runs.
    """
    import ray

    started = False
    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.ERROR
        # Ray reads these when the driver starts Tune; trials log to MLflow, so Tune's own loggers are off.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_SAVE_PERIOD_S)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # Epochs between evaluations report no mAP; Tune would otherwise end the search at the first one.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        # Trials on other nodes do not share the driver's environment: pass on MLflow's client settings
        # (credentials, retries), the tracking wait and the deterministic cuBLAS workspace.
        passed = {k: v for k, v in os.environ.items()
                  if k.startswith("MLFLOW_") or k in (TRACKING_WAIT_S, "CUBLAS_WORKSPACE_CONFIG")}
        options = {"log_to_driver": verbose, "logging_level": level,
                   **({"runtime_env": {"env_vars": passed}} if passed else {})}
        try:
            if address:
                ray.init(address=address, **options)
            else:  # "local" never attaches to a cluster someone else started on this machine
                ray.init(address="local", include_dashboard=False, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot reach the Ray cluster at {address}: {err}") from None
        started = True
    _quiet(verbose)
    total = ray.cluster_resources()
    for key, need in (("CPU", (resources or {}).get("cpu", 1)), ("GPU", (resources or {}).get("gpu", 0))):
        if need > total.get(key, 0):
            where = f"Ray cluster at {address}" if address else "this machine"
            raise UserError(f"each trial asks for {need:g} {key}(s) but {where} has {total.get(key, 0):g}; "
                            f"lower resources.{key.lower()}s")
    return started


def _quiet(verbose: bool) -> None:
    """Silence Ray's and Optuna's own logging unless asked for (trial failures reach the console through MLflow)."""
    if verbose:
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray\..*")


def run_trials(ctx: RunContext, *, param_space: dict[str, Any], num_samples: int = 1, search_alg: Any = None,
               scheduler: Any = None, metric: str, mode: str, resources: dict[str, float], max_concurrent: int,
               storage_dir: Path, name: str, ray_address: str | None = None, resume: bool = False,
               time_budget_s: float | None = None, on_result: Callable | None = None,
               on_complete: Callable[[TrialOutcome], None] | None = None,
               verbose: bool = False) -> list[TrialOutcome]:
    """Run (or, with resume=True, continue) the trials of one search or ablation under Ray Tune.

    Args:
        ctx: shared by every trial; ctx.group names the Tune experiment's MLflow group.
        param_space: Tune param space (e.g. grid_search values); {} when `search_alg` brings its own space.
        num_samples / search_alg / scheduler / time_budget_s: as in ray.tune.TuneConfig; the scheduler should use
            time_attr="epoch" (reported by every trial) and no metric/mode of its own.
        metric, mode: the result the scheduler ranks trials by.
        resources: {"cpu": n, "gpu": fraction} per trial; several trials share a GPU when gpu < 1.
        max_concurrent: trials running at once.
        storage_dir / name: Tune's experiment folder storage_dir/name (what resume=True restores).
        on_result(trial_id, params, result): called on the driver for every reported result.
        on_complete(outcome): called on the driver when a trial finishes, fails or is stopped.

    Returns:
        One TrialOutcome per trial of the group, in start order (previous sessions' trials included).
    """
    from ray import tune

    start_ray(ray_address, resources, verbose=verbose)
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=dataclasses.asdict(ctx)),
                                    {"cpu": resources.get("cpu", 1), "gpu": resources.get("gpu", 0)})
    path = Path(storage_dir) / name
    session = _SESSIONS[ctx.group] = _Session(on_result, on_complete)
    _fit(ctx, session, path, trainable, resume=resume, param_space=param_space, num_samples=num_samples,
         search_alg=search_alg, scheduler=scheduler, metric=metric, mode=mode, max_concurrent=max_concurrent,
         time_budget_s=time_budget_s, retries=MAX_RETRIES if ray_address else 0)
    found = outcomes(ctx)
    recorded = {o.trial_id for o in found}
    for trial_id, (status, params, _) in session.trials.items():  # trials that ended before opening their run
        if trial_id not in recorded:
            failed = status == "ERROR"
            reason = "failed before its MLflow run started" if failed else "not started when the search ended"
            found.append(TrialOutcome(trial_id, params, "failed" if failed else "interrupted", reason))
    return found


def _fit(ctx: RunContext, session: _Session, path: Path, trainable: Any, *, resume: bool, param_space: dict,
         num_samples: int, search_alg: Any, scheduler: Any, metric: str, mode: str, max_concurrent: int,
         time_budget_s: float | None, retries: int) -> None:
    """Tuner.fit (restored when resuming), then the group's runs that Tune left open are closed."""
    from ray import tune

    try:
        if resume and (path / "tuner.pkl").exists():
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                            metric=metric, mode=mode, max_concurrent_trials=max_concurrent,
                                            time_budget_s=time_budget_s, reuse_actors=True),
                run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent.resolve()), verbose=0,
                                          callbacks=[_TrialEvents(ctx)],
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=retries)))
        tuner.fit()
    except BaseException:
        _SESSIONS.pop(ctx.group, None)
        with contextlib.suppress(Exception):  # the error in flight says more than a failed cleanup would
            _close_open_runs(ctx, session, wait=False)
        raise
    _SESSIONS.pop(ctx.group, None)
    _close_open_runs(ctx, session)


def _close_open_runs(ctx: RunContext, session: _Session, *, wait: bool = True) -> None:
    mark_lost(ctx, set(session.trials), wait=wait)
    ended = {trial_id: ("failed", error) if status == "ERROR" else
             ("stopped", "early-stopped by the scheduler (recorded when the search ended)")
             for trial_id, (status, _, error) in session.trials.items() if status in ("ERROR", "TERMINATED")}
    close_unfinished(ctx, ended, wait=wait)


def mark_lost(ctx: RunContext, known: set[str], *, wait: bool = True) -> None:
    """Tag 'lost' the group's runs of trials that Tune no longer knows.

    A driver killed outright loses the trials it started after Tune last saved its state (at most a second
    before); the restored experiment replaces them with new trials. Their runs stay in MLflow, tagged, and out of
    the outcomes, so that every trial of the experiment has exactly one run.
    """
    if not known:  # Tune never got as far as listing its trials
        return
    tracker = RetryingTracker(ctx.tracking_uri, ctx.experiment, wait=wait)
    for run in tracker.group_runs(ctx.group):
        if run.data.tags["agch.trial_id"] not in known and run.data.tags.get("agch.status") != "lost":
            reason = "started after the search's last saved state by a driver that was killed; not part of it"
            tracker.set_tags(run.info.run_id, {"agch.status": "lost", "agch.reason": reason})
            if run.info.status == "RUNNING":
                tracker.end_run(run.info.run_id, "KILLED")


def close_unfinished(ctx: RunContext, ended: dict[str, tuple[str, str]] | None = None, *, wait: bool = True) -> None:
    """Close the group's runs still open after Tune returned.

    `ended`: trial id -> (state, reason) for trials Tune has ended whose runs no one closed (the driver could not
    reach the tracking server then): 'failed' with the trial's error, or 'stopped' by the scheduler. Tune does
    not run those again. Any other open run is interrupted: a resume continues it from its last checkpoint.
    """
    interrupted = ("interrupted", "the search ended before this trial did; `resume` continues it from its last "
                   "checkpoint")
    tracker = RetryingTracker(ctx.tracking_uri, ctx.experiment, wait=wait)
    for run in tracker.group_runs(ctx.group):
        if run.info.status == "RUNNING" and run.data.tags.get("agch.status") != "lost":
            state, reason = (ended or {}).get(run.data.tags["agch.trial_id"], interrupted)
            end_trial_run(tracker, run.info.run_id, state, reason)


def outcomes(ctx: RunContext) -> list[TrialOutcome]:
    """Every trial of the group as recorded in MLflow, in start order (lost runs left out)."""
    tracker = RetryingTracker(ctx.tracking_uri, ctx.experiment)
    return [_outcome(run) for run in tracker.group_runs(ctx.group) if run.data.tags.get("agch.status") != "lost"]


def _outcome(run: Any) -> TrialOutcome:
    tags = run.data.tags
    return TrialOutcome(trial_id=tags["agch.trial_id"], params=json.loads(tags.get("agch.trial_params", "{}")),
                        status=tags.get("agch.status", "interrupted"), reason=tags.get("agch.reason") or None,
                        metrics=dict(run.data.metrics), run_id=run.info.run_id,
                        epochs=int(run.data.metrics.get("epoch", 0)))


class _TrialEvents(Callback):
    """Driver-side Tune callback: closes the MLflow runs of early-stopped trials and feeds the live console."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self._tracker: RetryingTracker | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"ctx": self.ctx, "_tracker": None}  # a live MLflow client is not picklable

    @property
    def tracker(self) -> RetryingTracker:
        if self._tracker is None:
            self._tracker = RetryingTracker(self.ctx.tracking_uri, self.ctx.experiment)
        return self._tracker

    @property
    def session(self) -> _Session:
        return _SESSIONS.get(self.ctx.group) or _Session()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.session.on_result is not None:
            self.session.on_result(trial.trial_id, dict(trial.config), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        with self._best_effort(trial):
            run = self._run_of(trial)
            if run is not None and not last.get(FINAL) and run.info.status == "RUNNING":
                end_trial_run(self.tracker, run.info.run_id, "stopped",
                              f"early-stopped by the scheduler after epoch {last.get('epoch', '?')}")
                run = self._run_of(trial)  # as now recorded
            self._notify(run)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._best_effort(trial):
            run = self._run_of(trial)
            if run is not None and run.info.status == "RUNNING":  # the trial's process died before it could say why
                end_trial_run(self.tracker, run.info.run_id, "failed", _last_line(trial.error_file))
                run = self._run_of(trial)  # as now recorded
            self._notify(run)

    @contextlib.contextmanager
    def _best_effort(self, trial: Any) -> Iterator[None]:
        """Bookkeeping that fails (tracking server gone past its wait) must not end the search: the runs left
        open are closed when Tune returns (close_unfinished), from Tune's own view of each trial."""
        try:
            yield
        except Exception as err:
            print(f"agch: could not record the end of trial {trial.trial_id} in MLflow now "
                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                  "it is recorded when the search ends", file=sys.stderr)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.session.trials.update({t.trial_id: (t.status, dict(t.config),
                                                 _last_line(t.error_file) if t.status == "ERROR" else None)
                                    for t in trials})

    def _run_of(self, trial: Any) -> Any | None:
        return self.tracker.find_trial_run(self.ctx.group, trial_slot(self.ctx, dict(trial.config)))

    def _notify(self, run: Any | None) -> None:
        if self.session.on_complete is not None and run is not None:
            self.session.on_complete(_outcome(run))


def _last_line(path: str | None) -> str:
    """The last line of a Tune error file: the exception that ended the trial's process."""
    try:
        lines = [line for line in Path(path or "").read_text().splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"trial process failed: {lines[-1].strip() if lines else 'no error recorded'}"

"""The driver side of the Ray Tune runner shared by agch-search and agch-ablate: start Ray, build or restore the
Tuner, watch trials end, and close or mark their MLflow runs. What runs inside a trial is agch.runs.trial.

Thin by design: Tune schedules and restores trials, the caller's search algorithm or grid picks their params,
`agch.method.train.train` trains, `agch.runs.tracking` records. Nothing here knows about Optuna or ablation designs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from agch.errors import UserError
from agch.runs.tracking import TRACKING_WAIT_S, RetryingTracker
from agch.runs.context import CHECKPOINT_ENV, FINAL, RunContext, checkpoint_period, end_trial_run, trial_slot
from agch.runs.trial import run_trial
from agch.runs.names import Tag

STATES = ("finished", "failed", "stopped", "interrupted")
"""TrialOutcome.status: stopped = early-stopped by the scheduler; interrupted = the search ended first (Ctrl-C, time
budget, a killed driver): a resume continues it. A run tagged 'lost' belongs to no trial any more (see mark_lost)."""
# Tune saves its experiment state (which trials finished, the searcher) at most this often. Short, so that a driver
# killed right after a trial finished still knows on resume that it finished.
EXPERIMENT_SAVE_PERIOD_S = "1"

LOCAL_RAY = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
"""System settings of the private local Ray: no idle workers started ahead. Trials run in actors, which get their own
processes, so the prestarted ones only took CPU: two of them, polling, ~1.3 CPU-seconds a minute while trials ran
(docs/search.md, "Overhead of the service")."""

MAX_RETRIES = 2
"""On a cluster (--ray-address), times Tune restarts a trial whose worker died (node lost, OOM), from its last
checkpoint and into its own MLflow run; a trial that failed on its own (NaN loss, collapse) replays its recorded
failure at once instead. A local Ray loses no nodes, so there trials are not retried: a retry racing a Ctrl-C
shutdown could open a second run for the same trial."""


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
    name: str = ""
    """the MLflow run's name ('t2 δ=0.0563 γv=3.62 γt=1.45')."""


@dataclass
class _Session:
    """What the driver-side callback shares with run_trials while one group's trials run."""

    on_result: Callable | None = None
    on_complete: Callable | None = None
    trials: dict[str, tuple[str, dict, str | None]] = field(default_factory=dict)
    """Tune's view at the end: trial id -> (Tune status, params, the error that ended an ERROR trial). The status is
    STOPPED for a trial the scheduler ended (Tune marks its last result done) and TERMINATED otherwise: Tune also
    terminates the trials still running when the search ends (Ctrl-C, time budget), which are interrupted."""


_SESSIONS: dict[str, _Session] = {}
"""Live sessions by group. Tune pickles RunConfig (callbacks included) into its experiment folder and uses that copy
after Tuner.restore, so the console and this bookkeeping cannot be fields of the callback object itself."""


# --------------------------------------------------------------------------------------------------- the driver
def start_ray(address: str | None = None, resources: dict[str, float] | None = None, *, verbose: bool = False) -> bool:
    """Connect to `address` or start a quiet local Ray (once per process); check that a trial fits.

    Returns True when this call started Ray (the caller then owns `ray.shutdown()`). Raises UserError when the
    cluster cannot be reached or one trial asks for more CPUs or GPUs than the cluster has, before any trial runs.
    """
    import ray

    started = False
    checkpoint_period()  # a bad $AGCH_CHECKPOINT_EVERY_S is refused before any trial starts
    if not ray.is_initialized():
        level = logging.INFO if verbose else logging.ERROR
        # Ray reads these when the driver starts Tune; trials log to MLflow, so Tune's own loggers are off.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_SAVE_PERIOD_S)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # Epochs between evaluations report no mAP; Tune would otherwise end the search at the first one.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
        # Trials on other nodes do not share the driver's environment: pass on MLflow's client settings
        # (credentials, retries), the tracking wait, the checkpoint period and the deterministic cuBLAS workspace.
        passed = {k: v for k, v in os.environ.items()
                  if k.startswith("MLFLOW_") or k in (TRACKING_WAIT_S, CHECKPOINT_ENV, "CUBLAS_WORKSPACE_CONFIG")}
        options = {"log_to_driver": verbose, "logging_level": level,
                   **({"runtime_env": {"env_vars": passed}} if passed else {})}
        try:
            if address:
                ray.init(address=address, **options)
            else:  # "local" never attaches to a cluster someone else started on this machine
                ray.init(address="local", include_dashboard=False, _system_config=LOCAL_RAY, **options)
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
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=dataclasses.asdict(ctx)),
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
            from agch.runs import legacy

            legacy.install()  # an experiment started before agch had subpackages names its objects the old way
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
             for trial_id, (status, _, error) in session.trials.items() if status in ("ERROR", "STOPPED")}
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
        if run.data.tags[Tag.TRIAL_ID] not in known and run.data.tags.get(Tag.STATUS) != "lost":
            reason = "started after the search's last saved state by a driver that was killed; not part of it"
            tracker.set_tags(run.info.run_id, {Tag.STATUS: "lost", Tag.REASON: reason})
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
        if run.info.status == "RUNNING" and run.data.tags.get(Tag.STATUS) != "lost":
            state, reason = (ended or {}).get(run.data.tags[Tag.TRIAL_ID], interrupted)
            end_trial_run(tracker, run.info.run_id, state, reason)


def outcomes(ctx: RunContext) -> list[TrialOutcome]:
    """Every trial of the group as recorded in MLflow, in start order (lost runs left out)."""
    tracker = RetryingTracker(ctx.tracking_uri, ctx.experiment)
    return [_outcome(run) for run in tracker.group_runs(ctx.group) if run.data.tags.get(Tag.STATUS) != "lost"]


def _outcome(run: Any) -> TrialOutcome:
    tags = run.data.tags
    return TrialOutcome(trial_id=tags[Tag.TRIAL_ID], params=json.loads(tags.get(Tag.TRIAL_PARAMS, "{}")),
                        status=tags.get(Tag.STATUS, "interrupted"), reason=tags.get(Tag.REASON) or None,
                        metrics=dict(run.data.metrics), run_id=run.info.run_id,
                        epochs=int(run.data.metrics.get("epoch", 0)), name=run.info.run_name or "")


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
        stopped = lambda t: t.status == "TERMINATED" and (t.last_result or {}).get("done") and not (  # noqa: E731
            t.last_result or {}).get(FINAL)
        self.session.trials.update({t.trial_id: ("STOPPED" if stopped(t) else t.status, dict(t.config),
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

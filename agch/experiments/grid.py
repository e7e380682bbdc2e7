"""Cells × seeds as Ray Tune grids, for agch-ablate and agch-table: recorded runs found and reused by identity, an
interrupted attempt of the same plan resumed (its parent run and Tune grids), the rest run through agch.runs.driver,
and one record per cell × seed. What the cells are: agch.experiments.ablation_plan."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.experiments.ablation_plan import Plan, Trial, trial_identity, with_settings
from agch.experiments.ablation_spec import trial_resources
from agch.runs.names import Tag


RESULT_STATES = ("finished", "collapsed")
"""Trial states whose final metrics enter the statistics."""


@dataclass
class TrialRecord:
    """How one cell × seed ended up, and where its run is."""

    trial: Trial
    status: str
    """'finished' | 'collapsed' (trained to the end; codes collapsed) | 'failed' | 'not run' (interrupted)."""
    source: str = ""
    """'trained' (by this invocation), 'resumed' (by an interrupted attempt of this ablation), 'reused' (other)."""
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    origin: str | None = None
    """for a reused run: the group and parent run it was recorded under."""




def completed(run: Any) -> bool:
    """Trained to its end: FINISHED (collapsed codes included: a collapse is a result, the balance fix exists because
    codes collapsed without it)."""
    return run.info.status == "FINISHED" and run.data.tags.get(Tag.STATUS, "finished") == "finished"


def recorded_runs(tracker: Any, dataset_identities: Iterable[str]) -> dict[str, list[Any]]:
    """Completed runs on these datasets in every experiment of the store, by their agch.identity tag."""
    found: dict[str, list[Any]] = {}
    for identity in dict.fromkeys(dataset_identities):
        for run in tracker.runs_everywhere(f"tags.`dataset.identity` = '{identity}'"):
            if Tag.IDENTITY in run.data.tags and completed(run):
                found.setdefault(run.data.tags[Tag.IDENTITY], []).append(run)
    return found


def reusable(found: dict[str, list[Any]], precision: dict[str, str], parent: str | None = None) -> dict[str, list]:
    """`found` keeping, per identity, the runs of `parent` and the runs of others at that identity's precision."""
    keep = {i: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent
                or r.data.tags.get(Tag.PRECISION) == precision.get(i)] for i, runs in found.items()}
    return {i: runs for i, runs in keep.items() if runs}


def pick_run(runs: list[Any], parent_run_id: str) -> Any:
    """The run of this ablation when there is one, else the most recent."""
    return max(runs, key=lambda r: (r.data.tags.get("mlflow.parentRunId") == parent_run_id, r.info.start_time))


def interrupted_parent(tracker: Any, plan_identity: str) -> str | None:
    """The parent run of the latest attempt at this plan, when that attempt did not finish."""
    runs = tracker.runs(f"tags.`{Tag.PLAN}` = '{plan_identity}'", max_results=1,
                        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def tune_groups(plan: Plan, pending: list[Trial], prefix: str) -> list[dict[str, Any]]:
    """Pending trials as Ray Tune grids: one per distinct (base without the switched keys and fixes, seeds),
    grid = the cells' settings of those keys × seeds.

    A grid is a cross product, so cells whose other settings differ (e.g. the paper and debug-log bases) or that
    miss different seeds go to separate groups. Each group's name is its Tune experiment and its agch.group tag.
    """
    switched = ({f.key for f in plan.spec.factors} | {f"fixes.{name}" for name in cfg.FIX_NAMES}
                | set(plan.grid_keys))
    seeds_of: dict[str, list[int]] = {}
    for trial in pending:
        seeds_of.setdefault(trial.cell, []).append(trial.seed)
    groups: dict[str, dict[str, Any]] = {}
    for cell, seeds in seeds_of.items():
        flat = cfg.to_flat(plan.cells[cell].config)
        rest = {k: v for k, v in flat.items() if k not in switched}
        dataset = plan.cells[cell].dataset  # a trial's dataset comes with its group's RunContext
        key = json.dumps([rest, sorted(seeds), dataset], sort_keys=True, default=str)
        group = groups.setdefault(key, {"base": flat, "settings": [], "seeds": sorted(seeds), "dataset": dataset})
        group["settings"].append({k: flat[k] for k in sorted(switched)})
    return [dict(g, name=f"{prefix}-{i}") for i, g in enumerate(groups.values())]


def group_trials(group: dict[str, Any], dataset_identities: dict[str, str]) -> dict[tuple[str, int], str]:
    """The trials a Tune group trains: (its cell's settings as agch.runs.context.settings_key, seed) -> the trial's
    identity, computed as its run's agch.identity tag will be (once per trial, here; a trial's params find it)."""
    from agch.runs.context import settings_key

    base = cfg.from_flat(group["base"])
    dataset = dataset_identities[group.get("dataset", "")]
    return {(settings_key(settings), seed): trial_identity(with_settings(base, settings), seed, dataset)
            for settings in group.get("settings", []) for seed in group["seeds"]}


def group_identities(group: dict[str, Any], dataset_identities: dict[str, str]) -> set[str]:
    """The trial identities a Tune group trains."""
    return set(group_trials(group, dataset_identities).values())


def run_plan(plan: Plan, paths: dict[str, Path], tracker: Any, start: Any, *, experiment: str, device: str,
             rerun: bool, ray_address: str | None, storage_dir: Path | None, on_result: Any, say: Any,
             kind: str = "ablation") -> tuple[str, list[TrialRecord]]:
    """Train every cell × seed of `plan` not yet recorded (agch-ablate, agch-table): reuse recorded runs, resume an
    interrupted attempt of the same plan (its parent run and Tune grids), run the rest as Tune grids.

    `paths`: the dataset file of each of plan.dataset_identities ('' when there is one). `start()` opens the parent
    run (tagged agch.plan = plan.identity) when there is no interrupted one to resume.
    Returns (parent run id, one TrialRecord per cell × seed in plan order).
    """
    from agch.paths import home
    from agch.method.device import precision_of

    storage = (storage_dir or home() / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    parent = None if rerun else interrupted_parent(tracker, plan.identity)
    if parent is not None:
        say(f"resuming the interrupted run of this {kind} (MLflow run {parent})")
        tracker.reopen(parent)
    else:
        parent = start()
    groups_file = storage / f"ablation-{parent}.json"
    groups: list[dict[str, Any]] = json.loads(groups_file.read_text()) if groups_file.exists() else []
    runner = GroupRunner(plan, paths, tracker.uri, experiment, parent, device, storage,
                         trial_resources(plan.spec.resources, device), ray_address, on_result, say, kind)
    try:
        precision = {t.identity: precision_of(plan.cells[t.cell].config, device) for t in plan.trials()}
        before = {} if rerun else reusable(recorded_runs(tracker, plan.dataset_identities.values()), precision)
        pending = [t for t in plan.trials() if t.identity not in before]
        if len(pending) < len(plan.trials()):
            say(f"{len(plan.trials()) - len(pending)} of {len(plan.trials())} cell × seed runs are already "
                f"recorded in {tracker.uri}: reused, not retrained (--rerun forces them)")
        attempted: set[str] = set()
        complete = True
        for group in groups:  # an interrupted attempt's Tune experiments: continue them from their checkpoints
            members = group_identities(group, plan.dataset_identities)
            if complete and members & {t.identity for t in pending} and (storage / group["name"]).is_dir():
                say(f"resuming Ray Tune experiment {storage / group['name']}")
                complete = runner.run(group, resume=True)
                attempted |= members
        fresh = tune_groups(plan, [t for t in pending if t.identity not in attempted],
                            prefix=f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', plan.spec.name)}-{parent[:8]}-{len(groups)}")
        if fresh:
            groups_file.write_text(json.dumps(groups + fresh, indent=1, default=str))
        for group in fresh:
            complete = complete and runner.run(group, resume=False)  # after an interruption, start nothing new
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight matters more than closing the parent
            tracker.end_run(parent, "KILLED")
        raise
    final = reusable(recorded_runs(tracker, plan.dataset_identities.values()), precision, parent)
    return parent, [record_of(t, final.get(t.identity, []), runner.outcomes.get(t.identity), parent,
                              t.identity in before, rerun) for t in plan.trials()]


@dataclass
class GroupRunner:
    """Runs one Tune grid of an ablation through agch.runs.driver and keeps each trial's outcome by identity."""

    plan: Plan
    datasets: dict[str, Path]
    """dataset name ("" for the one dataset) -> its file; each group trains on its own."""
    tracking_uri: str
    experiment: str
    parent: str
    device: str
    storage: Path
    resources: dict[str, float]
    ray_address: str | None
    on_result: Any
    say: Any
    kind: str = "ablation"
    """'ablation' or 'table': what the runs' descriptions call their parent."""
    outcomes: dict[str, Any] = field(default_factory=dict)

    def run(self, group: dict[str, Any], resume: bool) -> bool:
        """Run (or restore) one grid; False when it ended early (interrupted)."""
        from ray import tune

        from agch.runs.driver import run_trials
        from agch.runs.context import SETTINGS, RunContext, settings_key

        dataset = group.get("dataset", "")
        identities = group_trials(group, self.plan.dataset_identities)
        identity_of = lambda params: identities.get((settings_key(params[SETTINGS]), params["seed"]))  # noqa: E731
        by_identity = {t.identity: t for t in self.plan.trials()}
        cells = {key: by_identity.get(identity) for (key, seed), identity in identities.items()
                 if seed == group["seeds"][0]}
        ctx = RunContext(dataset=str(self.datasets[dataset]), tracking_uri=self.tracking_uri,
                         experiment=self.experiment, parent_run_id=self.parent, device=self.device, base=group["base"],
                         group=group["name"], name=self.plan.spec.name, kind=self.kind,
                         arm_labels={k: self.plan.cells[t.cell].label for k, t in cells.items() if t is not None})

        def name(params: dict[str, Any]) -> tuple[str, int] | None:
            trial = by_identity.get(identity_of(params))
            return (self.plan.cells[trial.cell].label, trial.seed) if trial is not None else None

        def relay(trial_id: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
            if self.on_result is not None and name(params) is not None:
                self.on_result(*name(params), metrics)

        def ended(outcome: Any) -> None:
            if outcome.status != "finished" and name(outcome.params) is not None:
                label, seed = name(outcome.params)
                self.say(f"  {label} seed {seed}: {outcome.status}: {outcome.reason}")

        size = len(group["settings"]) * len(group["seeds"])
        found = run_trials(ctx, param_space={SETTINGS: tune.grid_search(group["settings"]),
                                             "seed": tune.grid_search(group["seeds"])},
                           # Nothing is ranked (a grid, no scheduler); 'epoch' is the one key every report has.
                           metric="epoch", mode="max", resources=self.resources,
                           max_concurrent=self.plan.spec.max_concurrent or size, storage_dir=self.storage,
                           name=group["name"], ray_address=self.ray_address, resume=resume, on_result=relay,
                           on_complete=ended)
        self.outcomes.update({identity_of(o.params): o for o in found})
        return len(found) == size and all(o.status in ("finished", "failed") for o in found)


def record_of(trial: Trial, runs: list[Any], outcome: Any, parent: str, recorded_before: bool,
              rerun: bool) -> TrialRecord:
    """One trial's record from its completed runs and this invocation's Tune outcome."""
    if rerun:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    if runs:
        run = pick_run(runs, parent)
        mine = run.data.tags.get("mlflow.parentRunId") == parent
        source = "reused" if not mine else ("resumed" if recorded_before else "trained")
        tags = run.data.tags
        status = "collapsed" if tags.get(Tag.COLLAPSED) == "True" else "finished"
        origin = None if mine else (f"{tags.get('agch.name') or tags.get('agch.group', '?')} (experiment "
                                    f"{run.info.experiment_id}, parent run {tags.get('mlflow.parentRunId', 'none')})")
        return TrialRecord(trial, status, source, run.info.run_id, dict(run.data.metrics),
                           tags.get(Tag.REASON) or None, origin)
    if outcome is not None and outcome.status == "failed":
        return TrialRecord(trial, "failed", "trained", outcome.run_id, dict(outcome.metrics), outcome.reason)
    return TrialRecord(trial, "not run", reason=getattr(outcome, "reason", None) or "interrupted")

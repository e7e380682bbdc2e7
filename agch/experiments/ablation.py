"""The ablation driver: reuse of recorded cells, resume, cells × seeds as Ray Tune grids.

The plan (which cells, which comparisons) comes from agch.experiments.ablation_plan; statistics and report from
agch.experiments.ablation_report.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agch import config as cfg
from agch.experiments.ablation_plan import Plan, Trial, build_plan, trial_identity, with_settings
from agch.experiments.ablation_spec import AblationSpec, trial_resources
from agch.errors import UserError


# ---------------------------------------------------------------- tracking: reuse and resume


def completed(run: Any) -> bool:
    """Trained to its end: FINISHED (collapsed codes included: a collapse is a result, the balance fix exists because
    codes collapsed without it)."""
    return run.info.status == "FINISHED" and run.data.tags.get("agch.status", "finished") == "finished"


def recorded_runs(tracker: Any, dataset_identities: Iterable[str]) -> dict[str, list[Any]]:
    """Completed runs on these datasets in every experiment of the store, by their agch.identity tag."""
    found: dict[str, list[Any]] = {}
    for identity in dict.fromkeys(dataset_identities):
        for run in tracker.runs_everywhere(f"tags.`dataset.identity` = '{identity}'"):
            if "agch.identity" in run.data.tags and completed(run):
                found.setdefault(run.data.tags["agch.identity"], []).append(run)
    return found


def reusable(found: dict[str, list[Any]], precision: dict[str, str], parent: str | None = None) -> dict[str, list]:
    """`found` keeping, per identity, the runs of `parent` and the runs of others at that identity's precision."""
    keep = {i: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent
                or r.data.tags.get("agch.precision") == precision.get(i)] for i, runs in found.items()}
    return {i: runs for i, runs in keep.items() if runs}


def pick_run(runs: list[Any], parent_run_id: str) -> Any:
    """The run of this ablation when there is one, else the most recent."""
    return max(runs, key=lambda r: (r.data.tags.get("mlflow.parentRunId") == parent_run_id, r.info.start_time))


def interrupted_parent(tracker: Any, plan_identity: str) -> str | None:
    """The parent run of the latest attempt at this plan, when that attempt did not finish."""
    runs = tracker.runs(f"tags.`agch.plan` = '{plan_identity}'", max_results=1,
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


def group_identities(group: dict[str, Any], dataset_identities: dict[str, str]) -> set[str]:
    """The trial identities a Tune group trains (as its trials will build their configs)."""
    base = cfg.from_flat(group["base"])
    return {trial_identity(with_settings(base, settings), seed, dataset_identities[group.get("dataset", "")])
            for settings in group.get("settings", []) for seed in group["seeds"]}


# ---------------------------------------------------------------- the driver

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


@dataclass
class AblationRun:
    """What run_ablation did: the plan, where it is recorded, and every trial's record."""

    plan: Plan
    parent_run_id: str
    tracking_uri: str
    experiment: str
    protocol: dict[str, Any]
    records: list[TrialRecord]
    references: dict[str, float] = field(default_factory=dict)
    """random ranking and CCA+ITQ on the same queries and bits (agch.method.baselines.reference_scores)."""

    @property
    def interrupted(self) -> bool:
        return any(r.status == "not run" for r in self.records)

    @property
    def topk(self) -> int:
        return next(iter(self.plan.cells.values())).config.topk

    def count(self, *, status: str | None = None, source: str | None = None) -> int:
        """Records with this status (any result state when None) and source."""
        return sum((r.status == status if status else r.status in RESULT_STATES)
                   and (source is None or r.source == source) for r in self.records)


def run_ablation(spec: AblationSpec, dataset: Path | None, *, tracking_uri: str | None = None, experiment: str = "agch",
                 device: str = "auto", rerun: bool = False, ray_address: str | None = None,
                 storage_dir: Path | None = None, on_result: Any = None, say: Any = print) -> AblationRun:
    """Train every cell × seed of `spec` not yet recorded, as Ray Tune trials under one MLflow parent run.

    Args:
        spec: the validated ablation.
        dataset: absolute path of the dataset file (None when spec.datasets names the two compared ones).
        tracking_uri: MLflow store (None: the embedded SQLite store).
        experiment: MLflow experiment of the parent and trial runs.
        device: 'auto', 'cpu' or 'cuda[:N]' for every trial.
        rerun: train everything again even when recorded (and never resume an interrupted attempt).
        ray_address: a Ray cluster; None starts a local Ray (or uses the one this process already started).
        storage_dir: Ray Tune's experiment folder (default: $AGCH_HOME/ray).
        on_result: called as on_result(cell_label, seed, metrics) as trial results arrive.
        say: where progress lines go.

    Returns:
        AblationRun; `analyse` turns it into the paired comparisons, `publish` records the report.
    """
    from agch.method.baselines import describe_references, reference_scores
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of
    from agch.runs.tracking import open_tracker
    from agch.runs.record import run_tags

    tracker = open_tracker(tracking_uri, experiment, wait=False)
    paths = {name: path.resolve() for name, path in spec.datasets} or {"": Path(dataset).resolve()}
    with contextlib.ExitStack() as stack:
        datas = {name: stack.enter_context(open_dataset(path)) for name, path in paths.items()}
        check_same_items(datas)
        plan = build_plan(spec, {name: data.identity for name, data in datas.items()})
        first, data = next(iter(plan.cells.values())).config, next(iter(datas.values()))
        protocol = protocol_of(first, data)
        if spec.datasets:
            protocol.update(dataset=" vs ".join(f"{name} = {d.name}" for name, d in datas.items()),
                            dataset_identity=", ".join(d.identity for d in datas.values()),
                            synthetic=",".join(sorted({p for d in datas.values() for p in d.synthetic})) or "none")
        described = f"mAP@{first.topk} / mAP@ALL, {describe_protocol(protocol)}"
        say(f"every mAP below: {described}")
        references = {name: reference_scores(first, d) for name, d in datas.items()}
        for name, scores in references.items():
            say(f"references on the same queries{f' ({name})' if name else ''}: "
                f"{describe_references(scores, first.topk)}")
        dataset_tags = {k: v for k, v in run_tags(first, data).items() if k.startswith("dataset.")}
        dataset_tags["agch.protocol"] = described  # what every mAP of the ablation's report is
        if spec.datasets:
            dataset_tags["agch.datasets"] = json.dumps({name: d.identity for name, d in datas.items()})

    def start() -> str:
        parent = start_parent(tracker, plan, dataset_tags)
        tracker.log_metrics(parent, {f"reference_{name + '_' if name else ''}{k}": v
                                     for name, scores in references.items() for k, v in scores.items()}, step=0)
        return parent

    parent, records = run_plan(plan, paths, tracker, start, experiment=experiment, device=device, rerun=rerun,
                               ray_address=ray_address, storage_dir=storage_dir, on_result=on_result, say=say)
    # the report's one references line holds for one dataset; two print theirs above and log them on the parent
    return AblationRun(plan, parent, tracker.uri, experiment, protocol, records,
                       references[""] if "" in references else {})


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


def check_same_items(datas: dict[str, Any]) -> None:
    """Datasets compared in one ablation must hold the same pairs (text features), labels and split; only the image
    features may differ. UserError naming both files and the first thing that differs."""
    (first, a), *others = datas.items()
    for name, b in others:
        differ = _first_difference(a, b)
        if differ:
            raise UserError(f"datasets {first} ({a.path}, {a.n} items) and {name} ({b.path}, {b.n} items) differ in "
                            f"their {differ}; a dataset comparison needs the same pairs, labels and split with other "
                            "image features (e.g. the same pairs with AlexNet vs VGG16 fc7)")


def _first_difference(a: Any, b: Any) -> str | None:
    if a.n != b.n:
        return "number of items"
    if not np.array_equal(a.labels, b.labels):
        return "labels"
    for part in ("query", "retrieval", "train"):
        if not np.array_equal(getattr(a.split, part), getattr(b.split, part)):
            return f"split ({part} rows)"
    if a.text_dim != b.text_dim:
        return "text features (dimension)"
    for offset, block in a.iter_rows("text", np.arange(a.n)):
        if not np.array_equal(block, b.rows("text", np.arange(offset, offset + len(block)))):
            return f"text features (rows {offset}..{offset + len(block) - 1})"
    return None


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
        base = cfg.from_flat(group["base"])
        identity_of = lambda params: trial_identity(  # noqa: E731
            with_settings(base, params[SETTINGS]), params["seed"], self.plan.dataset_identities[dataset])
        by_identity = {t.identity: t for t in self.plan.trials()}
        cells = {settings_key(s): by_identity.get(identity_of({SETTINGS: s, "seed": group["seeds"][0]}))
                 for s in group["settings"]}
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
        status = "collapsed" if tags.get("agch.collapsed") == "True" else "finished"
        origin = None if mine else (f"{tags.get('agch.name') or tags.get('agch.group', '?')} (experiment "
                                    f"{run.info.experiment_id}, parent run {tags.get('mlflow.parentRunId', 'none')})")
        return TrialRecord(trial, status, source, run.info.run_id, dict(run.data.metrics),
                           tags.get("agch.reason") or None, origin)
    if outcome is not None and outcome.status == "failed":
        return TrialRecord(trial, "failed", "trained", outcome.run_id, dict(outcome.metrics), outcome.reason)
    return TrialRecord(trial, "not run", reason=getattr(outcome, "reason", None) or "interrupted")


def start_parent(tracker: Any, plan: Plan, dataset_tags: dict[str, str]) -> str:
    """The MLflow parent run of one ablation: its spec, cells and comparisons."""
    spec = plan.spec
    parent = tracker.start_run(f"ablation-{spec.name}", tags={
        "agch.kind": "ablation", "agch.group": spec.name, "agch.name": spec.name, "agch.plan": plan.identity,
        **dataset_tags})
    tracker.log_params(parent, {
        "designs": ", ".join(f"{d.kind} ({d.preset})" for d in spec.designs),
        "factors": ", ".join(f.describe() for f in spec.factors), "seeds": ", ".join(map(str, spec.seeds)),
        "n_cells": len(plan.cells), "n_trials": len(plan.trials()),
        **{f"override.{k}": v for k, v in spec.overrides.items()}})
    cells = {c.label: {"identity": c.identity, **cfg.to_flat(c.config)} for c in plan.cells.values()}
    comparisons = [{"name": c.name, "on": [plan.cells[i].label for i in c.on],
                    "off": [plan.cells[i].label for i in c.off]} for c in plan.comparisons]
    tracker.log_files(parent, {"ablation.yaml": spec.to_dict(), "cells.yaml": cells,
                               "comparisons.yaml": {"comparisons": comparisons}})
    from agch.runs.ui import save_view

    k = next(iter(plan.cells.values())).config.topk
    save_view(tracker, spec.name, f"map{k}_mean",
              first=[f"metrics.`{m}`" for m in (f"map{k}_i2t", f"map{k}_t2i", "mapall_i2t", "mapall_t2i")],
              then=["tags.`agch.arm`", "tags.`agch.seed`", "tags.`agch.status`"])
    return parent

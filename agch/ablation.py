"""The ablation driver: reuse of recorded cells, resume, cells × seeds as Ray Tune grids, statistics and report.

The plan (which cells, which comparisons) comes from agch.ablation_plan; the statistics from agch.stats.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.ablation_plan import (DEFAULT_SEEDS, AblationSpec, Comparison, Plan, Trial, build_plan, trial_identity,
                                trial_resources, with_settings)


# ---------------------------------------------------------------- tracking: reuse and resume


def completed(run: Any) -> bool:
    """Trained to its last epoch: FINISHED, or FAILED only because its codes collapsed.

    The runner marks collapsed runs failed (a search should not pick them), but for an ablation a collapse is a
    result: the balance fix exists because codes collapsed without it, so those runs' mAP must count.
    """
    tags = run.data.tags
    if run.info.status == "FINISHED":
        return tags.get("agch.status", "finished") == "finished"
    return run.info.status == "FAILED" and tags.get("agch.collapsed") == "True" and not tags.get("agch.failed_epoch")


def recorded_runs(tracker: Any, dataset_identity: str) -> dict[str, list[Any]]:
    """Completed runs on this dataset in every experiment of the store, by their agch.identity tag."""
    client = tracker.client
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`dataset.identity` = '{dataset_identity}'"
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs(experiments, filter_string=query, max_results=1000, page_token=token)
        for run in page:
            if "agch.identity" in run.data.tags and completed(run):
                found.setdefault(run.data.tags["agch.identity"], []).append(run)
        token = page.token
        if not token:
            return found


def pick_run(runs: list[Any], parent_run_id: str) -> Any:
    """The run of this ablation when there is one, else the most recent."""
    return max(runs, key=lambda r: (r.data.tags.get("mlflow.parentRunId") == parent_run_id, r.info.start_time))


def interrupted_parent(tracker: Any, plan_identity: str) -> str | None:
    """The parent run of the latest attempt at this plan, when that attempt did not finish."""
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`agch.plan` = '{plan_identity}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def tune_groups(plan: Plan, pending: list[Trial], prefix: str) -> list[dict[str, Any]]:
    """Pending trials as Ray Tune grids: one per distinct (base without the switched keys and fixes, seeds),
    grid = the cells' settings of those keys × seeds.

    A grid is a cross product, so cells whose other settings differ (e.g. the paper and debug-log bases) or that
    miss different seeds go to separate groups. Each group's name is its Tune experiment and its agch.group tag.
    """
    switched = {f.key for f in plan.spec.factors} | {f"fixes.{name}" for name in cfg.FIX_NAMES}
    seeds_of: dict[str, list[int]] = {}
    for trial in pending:
        seeds_of.setdefault(trial.cell, []).append(trial.seed)
    groups: dict[str, dict[str, Any]] = {}
    for cell, seeds in seeds_of.items():
        flat = cfg.to_flat(plan.cells[cell].config)
        rest = {k: v for k, v in flat.items() if k not in switched}
        key = json.dumps([rest, sorted(seeds)], sort_keys=True, default=str)
        group = groups.setdefault(key, {"base": flat, "settings": [], "seeds": sorted(seeds)})
        group["settings"].append({k: flat[k] for k in sorted(switched)})
    return [dict(g, name=f"{prefix}-{i}") for i, g in enumerate(groups.values())]


def group_identities(group: dict[str, Any], dataset_identity: str) -> set[str]:
    """The trial identities a Tune group trains (as its trials will build their configs)."""
    base = cfg.from_flat(group["base"])
    return {trial_identity(with_settings(base, settings), seed, dataset_identity)
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
    """random ranking and CCA+ITQ on the same queries and bits (agch.baselines.reference_scores)."""

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


def run_ablation(spec: AblationSpec, dataset: Path, *, tracking_uri: str | None = None, experiment: str = "agch",
                 device: str = "auto", rerun: bool = False, ray_address: str | None = None,
                 storage_dir: Path | None = None, on_result: Any = None, say: Any = print) -> AblationRun:
    """Train every cell × seed of `spec` not yet recorded, as Ray Tune trials under one MLflow parent run.

    Args:
        spec: the validated ablation.
        dataset: absolute path of the dataset file.
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
    from agch.baselines import describe_references, reference_scores
    from agch.data import open_dataset
    from agch.paths import home
    from agch.tracking import Tracker, run_tags
    from agch.train import describe_protocol, protocol_of

    tracker = Tracker(tracking_uri, experiment)
    with open_dataset(dataset) as data:
        plan = build_plan(spec, data.identity)
        first = next(iter(plan.cells.values())).config
        protocol = protocol_of(first, data)
        say(f"every mAP below: mAP@{first.topk} / mAP@ALL, {describe_protocol(protocol)}")
        references = reference_scores(first, data)
        say(f"references on the same queries: {describe_references(references, first.topk)}")
        dataset_tags = {k: v for k, v in run_tags(first, data).items() if k.startswith("dataset.")}
    storage = (storage_dir or home() / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    parent = None if rerun else interrupted_parent(tracker, plan.identity)
    if parent is not None:
        say(f"resuming the interrupted run of this ablation (MLflow run {parent})")
        tracker.client.update_run(parent, status="RUNNING")
    else:
        parent = start_parent(tracker, plan, dataset_tags)
        tracker.log_metrics(parent, {f"reference_{k}": v for k, v in references.items()}, step=0)
    groups_file = storage / f"ablation-{parent}.json"
    groups: list[dict[str, Any]] = json.loads(groups_file.read_text()) if groups_file.exists() else []
    runner = GroupRunner(plan, dataset, tracker.uri, experiment, parent, device, storage,
                         trial_resources(spec.resources, device), ray_address, on_result, say)
    try:
        before = {} if rerun else recorded_runs(tracker, plan.dataset_identity)
        pending = [t for t in plan.trials() if t.identity not in before]
        if len(pending) < len(plan.trials()):
            say(f"{len(plan.trials()) - len(pending)} of {len(plan.trials())} cell × seed runs are already "
                f"recorded in {tracker.uri}: reused, not retrained (--rerun forces them)")
        attempted: set[str] = set()
        complete = True
        for group in groups:  # an interrupted attempt's Tune experiments: continue them from their checkpoints
            members = group_identities(group, plan.dataset_identity)
            if complete and members & {t.identity for t in pending} and (storage / group["name"]).is_dir():
                say(f"resuming Ray Tune experiment {storage / group['name']}")
                complete = runner.run(group, resume=True)
                attempted |= members
        fresh = tune_groups(plan, [t for t in pending if t.identity not in attempted],
                            prefix=f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)}-{parent[:8]}-{len(groups)}")
        if fresh:
            groups_file.write_text(json.dumps(groups + fresh, indent=1, default=str))
        for group in fresh:
            complete = complete and runner.run(group, resume=False)  # after an interruption, start nothing new
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight matters more than closing the parent
            tracker.end_run(parent, "KILLED")
        raise
    final = recorded_runs(tracker, plan.dataset_identity)
    records = [record_of(t, final.get(t.identity, []), runner.outcomes.get(t.identity), parent,
                         t.identity in before, rerun) for t in plan.trials()]
    return AblationRun(plan, parent, tracker.uri, experiment, protocol, records, references)


@dataclass
class GroupRunner:
    """Runs one Tune grid of an ablation through agch.runner and keeps each trial's outcome by identity."""

    plan: Plan
    dataset: Path
    tracking_uri: str
    experiment: str
    parent: str
    device: str
    storage: Path
    resources: dict[str, float]
    ray_address: str | None
    on_result: Any
    say: Any
    outcomes: dict[str, Any] = field(default_factory=dict)

    def run(self, group: dict[str, Any], resume: bool) -> bool:
        """Run (or restore) one grid; False when it ended early (interrupted)."""
        from ray import tune

        from agch.runner import SETTINGS, RunContext, run_trials

        ctx = RunContext(dataset=str(self.dataset), tracking_uri=self.tracking_uri, experiment=self.experiment,
                         parent_run_id=self.parent, device=self.device, base=group["base"], group=group["name"])
        base = cfg.from_flat(group["base"])
        identity_of = lambda params: trial_identity(  # noqa: E731
            with_settings(base, params[SETTINGS]), params["seed"], self.plan.dataset_identity)
        by_identity = {t.identity: t for t in self.plan.trials()}

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
        status = "finished" if run.info.status == "FINISHED" else "collapsed"
        return TrialRecord(trial, status, source, run.info.run_id, dict(run.data.metrics),
                           run.data.tags.get("agch.reason") or None)
    if outcome is not None and outcome.status == "failed":
        return TrialRecord(trial, "failed", "trained", outcome.run_id, dict(outcome.metrics), outcome.reason)
    return TrialRecord(trial, "not run", reason=getattr(outcome, "reason", None) or "interrupted")


def start_parent(tracker: Any, plan: Plan, dataset_tags: dict[str, str]) -> str:
    """The MLflow parent run of one ablation: its spec, cells and comparisons."""
    spec = plan.spec
    parent = tracker.start_run(f"ablation-{spec.name}", tags={
        "agch.kind": "ablation", "agch.group": spec.name, "agch.plan": plan.identity, **dataset_tags})
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
    return parent


# ---------------------------------------------------------------- analysis and report

DIAGNOSTICS: dict[str, str] = {
    "unique_frac_image": "unique codes img", "unique_frac_text": "unique codes txt",
    "bit_balance_image": "bit balance img", "bit_balance_text": "bit balance txt",
    "pair_hamming": "pair Hamming",
}
"""Per-arm code statistics shown beside mAP (the log's fixes targeted them): fraction of distinct codes, mean
|bit mean| (0 = every bit +1 half the time), mean Hamming distance between the same pair's image and text codes."""


def map_metrics(topk: int) -> dict[str, str]:
    """Metric key → column label naming the protocol's metric and direction."""
    return {f"map{topk}_i2t": f"mAP@{topk} I->T", f"map{topk}_t2i": f"mAP@{topk} T->I",
            "mapall_i2t": "mAP@ALL I->T", "mapall_t2i": "mAP@ALL T->I"}


@dataclass(frozen=True)
class ComparisonResult:
    """One comparison's paired statistics per mAP metric and its arms' diagnostics (on, off)."""

    comparison: Comparison
    maps: dict[str, Any]
    diagnostics: dict[str, tuple[Any, Any]]


def arm_values(run: AblationRun, cells: tuple[str, ...], key: str) -> list[float | None]:
    """Per seed, the metric averaged over the arm's cells (a factorial arm has several); None if any is missing."""
    by = {(r.trial.cell, r.trial.seed): r.metrics.get(key) for r in run.records if r.status in RESULT_STATES}
    out = []
    for seed in run.plan.spec.seeds:
        values = [by.get((cell, seed)) for cell in cells]
        out.append(None if any(v is None for v in values) else sum(values) / len(values))
    return out


def analyse(run: AblationRun) -> list[ComparisonResult]:
    """Paired statistics (agch.stats) for every comparison of the plan."""
    from agch.stats import paired_compare, summarize

    results = []
    for comp in run.plan.comparisons:
        maps = {key: paired_compare(arm_values(run, comp.on, key), arm_values(run, comp.off, key))
                for key in map_metrics(run.topk)}
        diags = {key: (summarize(arm_values(run, comp.on, key)), summarize(arm_values(run, comp.off, key)))
                 for key in DIAGNOSTICS}
        results.append(ComparisonResult(comp, maps, diags))
    return results


def protocol_line(run: AblationRun) -> str:
    """What every mAP in the report means (docs/protocol.md)."""
    from agch.train import describe_protocol

    return (f"mAP@{run.topk} and mAP@ALL (Hamming ranking, relevance = >=1 shared label), "
            f"{describe_protocol(run.protocol)}")


def report_tables(run: AblationRun, results: list[ComparisonResult]) -> dict[str, str]:
    """The report as console text, markdown and CSV (comparisons and trials)."""
    from agch.baselines import describe_references
    from agch.stats import CONFIDENCE, csv_text, interval, markdown_table, p_text, text_table

    labels = map_metrics(run.topk)
    ci = f"{CONFIDENCE:.0%} CI"
    head = ["comparison", "metric", "n", "on (mean ± std)", "off (mean ± std)", f"Δ on−off [{ci}]", "p (t)",
            "p (Wilcoxon)", "verdict"]
    rows = [[r.comparison.name, labels[k], m.n, m.on.text(), m.off.text(), interval(m), p_text(m.p_t),
             p_text(m.p_wilcoxon), m.verdict] for r in results for k, m in r.maps.items()]
    diag_head = ["comparison", "arm", *DIAGNOSTICS.values()]
    diag_rows = [[r.comparison.name, arm, *(r.diagnostics[k][i].text(3) for k in DIAGNOSTICS)]
                 for r in results for i, arm in enumerate(("on", "off"))]
    p = run.protocol
    csv_head = ["comparison", "factor", "design", "metric", "bits", "split", "dataset", "synthetic", "n", "on_mean",
                "on_std", "off_mean", "off_std", "diff_mean", "ci_low", "ci_high", "p_t", "p_wilcoxon", "verdict"]
    csv_rows = [[r.comparison.name, r.comparison.factor, r.comparison.design, labels[k], p["bits"], p["split"],
                 p["dataset"], p["synthetic"], m.n, m.on.mean, m.on.std, m.off.mean, m.off.std, m.diff_mean,
                 m.ci_low, m.ci_high, m.p_t, m.p_wilcoxon, m.verdict] for r in results for k, m in r.maps.items()]
    keys = [*labels, *DIAGNOSTICS]
    trial_head = ["cell", "seed", "status", "source", "run_id", "reason",
                  *(f"{labels[k]} ({p['bits']} bits, {p['split']} split)" if k in labels else k for k in keys)]
    cell_label = {c.identity: c.label for c in run.plan.cells.values()}
    trial_rows = [[cell_label[r.trial.cell], r.trial.seed, r.status, r.source, r.run_id or "", r.reason or "",
                   *(r.metrics.get(k, "") for k in keys)] for r in run.records]
    short = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    trial_md = [[short(v) for v in row] for row in trial_rows]
    notes = report_notes(run)
    references = (f"references on the same queries ({p['bits']} bits): "
                  f"{describe_references(run.references, run.topk)}" if run.references else "")
    console = "\n\n".join([f"protocol: {protocol_line(run)}", references, text_table(head, rows),
                           "code diagnostics per arm (mean ± std over seeds):\n" + text_table(diag_head, diag_rows),
                           "\n".join(notes)])
    markdown = "\n\n".join([f"# Ablation {run.plan.spec.name}", f"Protocol: {protocol_line(run)}.", references,
                            markdown_table(head, rows), "## Code diagnostics per arm",
                            markdown_table(diag_head, diag_rows), "## Notes", "\n".join(f"- {n}" for n in notes),
                            "## Trials", markdown_table(trial_head, trial_md)])
    return {"console": console, "results.md": markdown + "\n", "comparisons.csv": csv_text(csv_head, csv_rows),
            "trials.csv": csv_text(trial_head, trial_rows)}


def report_notes(run: AblationRun) -> list[str]:
    """How to read the verdicts, and what was reused, failed or not run."""
    from agch.stats import CONFIDENCE, min_wilcoxon_p

    n = len(run.plan.spec.seeds)
    notes = [f"verdict: the {CONFIDENCE:.0%} t interval of the paired difference excludes 0 ('helps' above, 'hurts' "
             f"below); one verdict per row, not corrected for the {len(run.plan.comparisons) * 4} rows of this table",
             "a difference that is the same at every seed has no t interval; the exact signed-rank test decides it "
             "('undecided' while its smallest possible p, 2 / 2^seeds, is not below 0.05)"]
    if n < 2:
        notes.append(f"{n} seed: no verdict is possible; pass --seeds 2 or more ({DEFAULT_SEEDS} recommended)")
    else:
        notes.append(f"with {n} seeds the exact Wilcoxon p cannot go below {min_wilcoxon_p(n):.3f}")
    notes.append(f"{len(run.records)} cell × seed runs: {run.count(source='trained')} trained now, "
                 f"{run.count(source='reused')} reused from earlier runs, {run.count(source='resumed')} finished "
                 f"before an interruption, {run.count(status='failed')} failed, {run.count(status='not run')} not run")
    collapsed = run.count(status="collapsed")
    if collapsed:
        notes.append(f"{collapsed} run(s) ended with collapsed codes (< 5% unique): their mAP counts (a collapse is "
                     "what some fixes prevent), though MLflow shows them FAILED")
    for r in run.records:
        if r.status == "failed":
            notes.append(f"failed: {run.plan.cells[r.trial.cell].label} seed {r.trial.seed}: {r.reason}")
    if run.interrupted:
        notes.append("interrupted: run the same command again to resume (finished runs are not retrained)")
    return notes


def publish(run: AblationRun, results: list[ComparisonResult], tables: dict[str, str]) -> None:
    """Log the report and the effect plot on the parent run and close it (KILLED when interrupted)."""
    from agch.stats import effect_plot
    from agch.tracking import Tracker

    tracker = Tracker(run.tracking_uri, run.experiment)
    labels = map_metrics(run.topk)
    panels = {f"{label}": [(r.comparison.name, r.maps[key]) for r in results] for key, label in labels.items()}
    plot = effect_plot(panels, f"ablation {run.plan.spec.name}, {len(run.plan.spec.seeds)} seeds, mean paired "
                               f"difference with its 95% t interval\n{protocol_line(run)}")
    tracker.log_files(run.parent_run_id, {name: text for name, text in tables.items() if name != "console"})
    tracker.log_files(run.parent_run_id, {"effects.png": plot})
    tracker.set_tags(run.parent_run_id, {
        "agch.trained": run.count(source="trained"), "agch.reused": run.count(source="reused"),
        "agch.resumed": run.count(source="resumed"), "agch.collapsed": run.count(status="collapsed"),
        "agch.failed": run.count(status="failed"), "agch.not_run": run.count(status="not run")})
    tracker.end_run(run.parent_run_id, "KILLED" if run.interrupted else "FINISHED")

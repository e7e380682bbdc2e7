"""An ablation's statistics and report: paired comparisons per metric, the tables (console, results.md, CSVs), the
notes on reuse and failures, and what is logged on the parent run. The runs themselves come from
agch.experiments.ablation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agch.experiments.ablation import AblationRun
from agch.experiments.grid import RESULT_STATES
from agch.experiments.ablation_plan import Comparison
from agch.experiments.ablation_spec import DEFAULT_SEEDS
from agch.runs.names import Tag

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
    """Paired statistics (agch.experiments.statistics) for every comparison of the plan."""
    from agch.experiments.statistics import paired_compare, summarize

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
    from agch.evaluation.protocol import describe_protocol

    return (f"mAP@{run.topk} and mAP@ALL (Hamming ranking, relevance = >=1 shared label), "
            f"{describe_protocol(run.protocol)}")


def report_tables(run: AblationRun, results: list[ComparisonResult]) -> dict[str, str]:
    """The report as console text, markdown and CSV (comparisons and trials)."""
    from agch.method.baselines import describe_references
    from agch.experiments.formatting import csv_text, markdown_table, text_table
    from agch.experiments.statistics import CONFIDENCE, interval, p_text

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
    from agch.experiments.statistics import CONFIDENCE, min_wilcoxon_p

    n = len(run.plan.spec.seeds)
    notes = [f"verdict: the {CONFIDENCE:.0%} t interval of the paired difference excludes 0 ('helps' above, 'hurts' "
             f"below); one verdict per row, not corrected for the {len(run.plan.comparisons) * 4} rows of this table",
             "a difference that is the same at every seed has no t interval; the exact signed-rank test decides it "
             "('undecided' while its smallest possible p, 2 / 2^seeds, is not below 0.05)"]
    if n < 2:
        notes.append(f"{n} seed: no verdict is possible; pass --seeds 2 or more ({DEFAULT_SEEDS} recommended)")
    else:
        notes.append(f"with {n} seeds the exact Wilcoxon p cannot go below {min_wilcoxon_p(n):.3f}")
    notes += provenance_notes(run)
    collapsed = run.count(status="collapsed")
    if collapsed:
        notes.append(f"{collapsed} run(s) ended with collapsed codes (< 5% unique): their mAP counts (a collapse is "
                     "what some fixes prevent); MLflow tags them agch.collapsed")
    if run.interrupted:
        notes.append("interrupted: run the same command again to resume (finished runs are not retrained)")
    return notes


def provenance_notes(run: AblationRun) -> list[str]:
    """Where every cell × seed's result came from (trained, reused from which runs, resumed), and what failed."""
    notes = [f"{len(run.records)} cell × seed runs: {run.count(source='trained')} trained now, "
             f"{run.count(source='reused')} reused from earlier runs, {run.count(source='resumed')} finished "
             f"before an interruption, {run.count(status='failed')} failed, {run.count(status='not run')} not run"]
    origins: dict[str, int] = {}
    for r in run.records:
        if r.source == "reused":
            origins[r.origin or "?"] = origins.get(r.origin or "?", 0) + 1
    notes.extend(f"reused {count} run(s) recorded by {origin}" for origin, count in origins.items())
    notes.extend(f"failed: {run.plan.cells[r.trial.cell].label} seed {r.trial.seed}: {r.reason}"
                 for r in run.records if r.status == "failed")
    return notes


def publish(run: AblationRun, results: list[ComparisonResult], tables: dict[str, str]) -> None:
    """Log the report and the effect plot on the parent run and close it (KILLED when interrupted)."""
    from agch.runs.tracking import open_tracker
    from agch.runs.ui import set_description

    tracker = open_tracker(run.tracking_uri, run.experiment)
    labels = map_metrics(run.topk)
    panels = {f"{label}": [(r.comparison.name, r.maps[key]) for r in results] for key, label in labels.items()}
    plot = effect_plot(panels, f"ablation {run.plan.spec.name}, {len(run.plan.spec.seeds)} seeds, mean paired "
                               f"difference with its 95% t interval\n{protocol_line(run)}")
    tracker.log_files(run.parent_run_id, {name: text for name, text in tables.items() if name != "console"})
    tracker.log_files(run.parent_run_id, {"effects.png": plot})
    effects, verdicts = {}, {}
    for r in results:
        name = re.sub(r"[^A-Za-z0-9_\-]+", ".", r.comparison.name).strip(".")  # 'alignment.one-fix.paper'
        for key, paired in r.maps.items():
            effects.update({f"effect.{name}.{key}": paired.diff_mean, f"effect.{name}.{key}.ci_low": paired.ci_low,
                            f"effect.{name}.{key}.ci_high": paired.ci_high, f"effect.{name}.{key}.p_t": paired.p_t})
            verdicts[f"{Tag.VERDICT}{name}.{key}"] = paired.verdict
    tracker.log_metrics(run.parent_run_id, effects, step=0)
    tracker.set_tags(run.parent_run_id, verdicts)
    set_description(tracker, run.parent_run_id, tables["results.md"])
    tracker.set_tags(run.parent_run_id, {
        Tag.TRAINED: run.count(source="trained"), Tag.REUSED: run.count(source="reused"),
        Tag.RESUMED: run.count(source="resumed"), Tag.COLLAPSED: run.count(status="collapsed"),
        Tag.FAILED: run.count(status="failed"), Tag.NOT_RUN: run.count(status="not run")})
    tracker.end_run(run.parent_run_id, "KILLED" if run.interrupted else "FINISHED")


def effect_plot(panels: dict[str, list[tuple[str, Any]]], title: str) -> bytes:
    """PNG: one panel per metric, each comparison's mean paired difference with its interval, a line at 0.

    Args:
        panels: metric label (naming its protocol) → [(comparison name, result)], drawn top to bottom.
        title: the figure title (the protocol the differences were measured under).
    """
    import io
    import math
    import textwrap

    from matplotlib.figure import Figure  # the object API renders with Agg and touches no global backend

    entries_per_panel = max((len(v) for v in panels.values()), default=1)
    cols = min(2, len(panels))
    grid_rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.5 * cols, grid_rows * (1.2 + 0.4 * entries_per_panel) + 0.6), layout="constrained")
    axes = fig.subplots(grid_rows, cols, sharey=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (label, entries) in zip(axes, panels.items()):
        ys = list(range(len(entries)))[::-1]
        for y, (_, r) in zip(ys, entries):
            color = {"helps": "tab:green", "hurts": "tab:red"}.get(r.verdict.split(" ")[0], "tab:gray")
            err = None if math.isnan(r.ci_low) else [[r.diff_mean - r.ci_low], [r.ci_high - r.diff_mean]]
            ax.errorbar([r.diff_mean], [y], xerr=err, fmt="o", color=color, capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_ylim(-0.6, len(entries) - 0.4)
        ax.set_yticks(ys, [name for name, _ in entries])
        ax.set_xlabel(f"Δ {label} (on − off)")
        ax.grid(axis="x", alpha=0.3)
    width = int(12 * 5.5 * cols)  # characters per title line at this font size
    lines = [*(textwrap.fill(line, width) for line in title.splitlines()),
             "green: helps, red: hurts, grey: no detectable effect"]
    fig.suptitle("\n".join(lines), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()

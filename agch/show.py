"""`agch-search show NAME` and `agch-ablate show NAME`: a search's or an ablation's results read back from the
tracking store alone (no Ray, no Optuna storage, no files of the run that recorded them)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from agch.errors import UserError


def _parent(tracker: Any, kind: str, name: str) -> Any:
    """The newest parent run of the search or ablation `name` in the tracker's experiment."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      f"tags.`agch.kind` = '{kind}' and tags.`agch.name` = '{name}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"no {kind} named '{name}' in experiment {tracker.experiment_id} of {tracker.uri} "
                        f"(pass the --tracking-uri and --experiment it was run with)")
    return runs[0]


def search_table(tracker: Any, name: str, markdown: bool = False, parent: Any = None) -> str:
    """Every trial of search `name` (parent run `parent`, else the newest search of that name), best first by its
    objective: run name, status, objective, mAP@ALL mean (as text, or as markdown: the parent run's description)."""
    from agch.space import describe_metric
    from agch.stats import markdown_table, text_table

    parent = parent or _parent(tracker, "search", name)
    objective = parent.data.params.get("objective", "map50_mean").split(",")[0]
    children = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=10000)
    trials = [r for r in children if r.data.tags.get("agch.trial_number") or r.data.tags.get("agch.trial_id")]
    trials.sort(key=lambda r: -r.data.metrics.get(objective, float("-inf")))
    def row(run: Any) -> list[Any]:
        tags, metrics = run.data.tags, run.data.metrics
        test = "test queries: " if tags.get("agch.group", "").endswith(".test") else ""
        collapsed = " (collapsed)" if tags.get("agch.collapsed") == "True" else ""
        return [test + run.info.run_name, tags.get("agch.status", "?") + collapsed, _value(metrics.get(objective)),
                _value(metrics.get("mapall_mean")), int(metrics.get("epoch", 0)), run.info.run_id]

    rows = [row(r) for r in trials]
    head = ["trial", "status", describe_metric(objective), "mAP@ALL mean(I->T, T->I)", "epochs", "run id"]
    protocol = parent.data.tags.get("agch.protocol", "")
    best = {k[len("agch.best."):]: v for k, v in parent.data.tags.items() if k.startswith("agch.best.")}
    lines = [f"search {name} ({parent.data.tags.get('agch.search_state', 'running')}): every mAP is {protocol}",
             (markdown_table if markdown else text_table)(head, rows)]
    if best:
        lines.append("best settings: " + ", ".join(f"{k}={v}" for k, v in best.items()))
    test = {k: v for k, v in parent.data.metrics.items() if k.startswith("test_map")}
    if test:
        lines.append("test queries, once: " + ", ".join(f"{describe_metric(k[5:])} {v:.4f}"
                                                         for k, v in sorted(test.items()))
                     + f" ({parent.data.tags.get('agch.test_protocol', '')})")
    return ("\n\n" if markdown else "\n").join(lines)


def ablation_report(tracker: Any, name: str) -> str:
    """The report (results.md) the newest ablation `name` logged on its parent run."""
    parent = _parent(tracker, "ablation", name)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = tracker.client.download_artifacts(parent.info.run_id, "results.md", folder)
        except Exception as err:  # MLflow raises several kinds for a missing artifact
            raise UserError(f"ablation '{name}' (run {parent.info.run_id}) has no results.md yet: it did not finish "
                            f"({type(err).__name__})") from None
        return Path(path).read_text()


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"

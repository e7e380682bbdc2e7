"""The MLflow UI a user opens on a search or an ablation: the links the commands print (a saved view of the runs
table, a run's page), the views behind them, and the run and experiment descriptions the pages open on.

MLflow 3.17 decides per browser between its GenAI and its model-training pages; the links carry UI_WORKFLOW, and
agch.runs.ui_app serves the UI with model training as the default (docs/search.md, "In the MLflow UI").
"""

from __future__ import annotations

import json
from typing import Any

from agch.runs.tracking import is_server
from agch.runs.names import Tag


UI_WORKFLOW = "workflowType=machine_learning"
"""URL state of MLflow 3.17's UI: show the model-training pages (runs table), whatever the browser chose before."""
UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` answers by default; a tracking server is its own UI."""
VIEW_TAG = "mlflow.sharedViewState."
"""Experiment tag prefix of a view of the runs table (MLflow's "Save & share view"): the link ui_link prints opens
it with viewStateShareKey."""


def ui_base(tracker: Any) -> str:
    """The MLflow UI's address for `tracker`'s experiment: .../#/experiments/ID."""
    return f"{tracker.uri.rstrip('/') if is_server(tracker.uri) else UI}/#/experiments/{tracker.experiment_id}"


def run_page(tracker: Any, run_id: str) -> str:
    """The MLflow UI's page of one run (its description, metrics, artifacts)."""
    return f"{ui_base(tracker)}/runs/{run_id}?{UI_WORKFLOW}"


def runs_filter(name: str) -> str:
    """The runs-table filter for the trials of search or ablation `name`: its parent and test runs left out."""
    return f"tags.`{Tag.NAME}` = '{name}' and tags.`{Tag.ROLE}` = 'trial'"


def save_view(tracker: Any, name: str, metric: str, *, first: list[str], then: list[str]) -> None:
    """Save the runs table of `name`'s trials as the link ui_link prints opens it: filtered (runs_filter), sorted by
    `metric`, best first, with these columns ('metrics.`map50_mean`', 'params.`delta`', 'tags.`agch.status`') after
    the run's name: `first` narrow enough that they fit beside MLflow's assistant panel on a laptop's screen, `then`
    to the right of them."""
    widths = {"attributes.`Run Name`": 250, **{column: 95 for column in first}}
    state = {"searchFilter": runs_filter(name), "orderByKey": f"metrics.`{metric}`", "orderByAsc": False,
             "selectedColumns": [*first, *then], "columnOrder": ["attributes.`Run Name`", *first, *then],
             "columnWidths": widths}
    tracker.set_experiment_tag(VIEW_TAG + name, json.dumps(state))


def ui_link(tracker: Any, name: str, metric: str) -> str:
    """The MLflow UI's runs table of `name`'s trials, best first by `metric`: its saved view (save_view) when there
    is one, else the same filter and order as URL state (the default columns then, which show no metric)."""
    from urllib.parse import quote

    if VIEW_TAG + name in tracker.experiment_tags():
        return f"{ui_base(tracker)}/runs?viewStateShareKey={quote(name)}&{UI_WORKFLOW}"
    query = f"searchFilter={quote(runs_filter(name))}&orderByKey={quote(f'metrics.`{metric}`')}&orderByAsc=false"
    return f"{ui_base(tracker)}/runs?{query}&{UI_WORKFLOW}"


def ui_hint(tracker: Any, name: str, metric: str, parent: str | None = None) -> str:
    """Lines telling how to open ui_link (and the parent run's page, whose description is the summary): for an
    SQLite store, the `mlflow ui` command first."""
    link = ui_link(tracker, name, metric)
    lines = [f"MLflow UI: {link}" if is_server(tracker.uri) else
             f"MLflow UI: run `mlflow ui --app-name agch --backend-store-uri {tracker.uri}`, then open\n  {link}"]
    if parent:
        lines.append(f"  the summary (the parent run's description): {run_page(tracker, parent)}")
    return "\n".join(lines)


NOTE_LIMIT = 7500
"""Characters of a run description (tag mlflow.note.content; MLflow keeps at most 8,000 per tag value)."""
NOTE = "mlflow.note.content"
"""Run and experiment tag: the description the MLflow UI shows (markdown) on the run's and the experiment's page."""
OWN_NOTE = Tag.NOTE
"""Experiment tag: the experiment description this project last wrote (a description someone else wrote is kept)."""


def set_description(tracker: Any, run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (rendered as markdown), cut at a line to fit NOTE_LIMIT."""
    if len(markdown) > NOTE_LIMIT:
        cut = markdown[:NOTE_LIMIT - 80].rsplit("\n", 1)[0]
        markdown = cut + "\n\n(cut to fit; the whole report is in the run's artifacts)"
    tracker.set_tags(run_id, {NOTE: markdown})


def describe_experiment(tracker: Any, markdown: str) -> None:
    """The experiment's description (the first thing its page shows), unless someone else wrote the current one."""
    tags = tracker.experiment_tags()
    if tags.get(NOTE, "") in ("", tags.get(OWN_NOTE)):
        markdown = markdown[:4900]  # MLflow keeps at most 5,000 characters per experiment tag value
        tracker.set_experiment_tag(NOTE, markdown)
        tracker.set_experiment_tag(OWN_NOTE, markdown)

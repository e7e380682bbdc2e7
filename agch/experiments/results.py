"""`agch-search show NAME` and `agch-ablate show NAME`: a search's or an ablation's results read back from the
tracking store alone (no Ray, no Optuna storage, no files of the run that recorded them)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from agch.errors import UserError
from agch.runs.names import Tag


def _parent(tracker: Any, kind: str, name: str) -> Any:
    """The newest parent run of the search or ablation `name` in the tracker's experiment."""
    runs = tracker.runs(f"tags.`{Tag.KIND}` = '{kind}' and tags.`{Tag.NAME}` = '{name}'", max_results=1,
                        order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"no {kind} named '{name}' in experiment {tracker.experiment_id} of {tracker.uri} "
                        f"(pass the --tracking-uri and --experiment it was run with)")
    return runs[0]


def role(run: Any) -> str:
    """'trial' or 'test' (a search's chosen settings on the test queries); runs recorded before the agch.role tag
    tell by their group."""
    tags = run.data.tags
    return tags.get(Tag.ROLE) or ("test" if tags.get(Tag.GROUP, "").endswith(".test") else "trial")


def search_table(tracker: Any, name: str, markdown: bool = False, parent: Any = None) -> str:
    """Search `name` (parent run `parent`, else the newest search of that name) read back from the tracking store:
    the winner by its trial name and link, the test-query figures, what every mAP is, the references, then every
    trial best first by its objective (as text, or as markdown: the parent run's description, whose first paragraph
    is the winner, what the UI shows before "Show more")."""
    return ("\n\n" if markdown else "\n").join(_search_paragraphs(tracker, name, markdown, parent))


def experiment_note(tracker: Any, name: str, parent: Any, trials_link: str) -> str:
    """The experiment's description after search `name` ended (its first line is what the UI's home page and the
    experiment's page show first): the search's winner, test-query figures and protocol, and where to look."""
    from agch.runs.ui import run_page

    head, *rest = _search_paragraphs(tracker, name, True, parent)[:-1]
    return "\n\n".join([f"newest search {name}: {head}", *rest,
                         f"[its trials, best first]({trials_link}) · "
                         f"[its summary]({run_page(tracker, parent.info.run_id)})"
                         " · every search of this experiment: filter `tags.agch.kind = 'search'`"])


def _search_paragraphs(tracker: Any, name: str, markdown: bool, parent: Any) -> list[str]:
    from agch.method.baselines import describe_references
    from agch.runs.names import describe_metric
    from agch.experiments.formatting import markdown_table, text_table
    from agch.runs.ui import run_page

    parent = parent or _parent(tracker, "search", name)
    tags, objective = parent.data.tags, parent.data.params.get("objective", "map50_mean").split(",")[0]
    children = tracker.runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=10000)
    trials = sorted((r for r in children if role(r) == "trial"),
                    key=lambda r: -r.data.metrics.get(objective, float("-inf")))
    tests = [r for r in children if role(r) == "test"]
    metric = describe_metric(objective)
    bold = (lambda text: f"**{text}**") if markdown else (lambda text: text)
    link = (lambda text, url: f"[{text}]({url})") if markdown else (lambda text, url: f"{text} ({url})")
    lines = []
    best = [r for r in trials if r.info.run_id in tags.get(Tag.BEST_RUN, "").split(",")]
    if best:
        run = best[0]  # its name gives the searched settings (3 digits; agch.best.<param> tags hold them in full)
        lines.append(f"best trial {bold(run.info.run_name)}: {metric} {bold(_value(run.data.metrics.get(objective)))}"
                     f" on the validation queries; {link('its run', run_page(tracker, run.info.run_id))}")
    test = {k[5:]: v for k, v in parent.data.metrics.items() if k.startswith("test_map")}
    if test:
        figures = ", ".join(f"{describe_metric(k)} {v:.4f}" for k, v in sorted(test.items()) if "mean" not in k)
        runs = ", ".join(link(r.info.run_name, run_page(tracker, r.info.run_id)) for r in tests)
        lines.append(f"the chosen settings on the test queries, scored once: {figures} "
                     f"({tags.get('agch.test_protocol', '')}" + (f"; {runs}" if runs else "") + ")")
    lines.append(f"search {name} ({tags.get('agch.search_state', 'running')}), {len(trials)} trials: every mAP is "
                 f"{tags.get('agch.protocol', '')}")
    references = {k[len("reference_"):]: v for k, v in parent.data.metrics.items() if k.startswith("reference_")}
    cutoff = next((key[len("random_map"):] for key in references if key[len("random_map"):].isdigit()), None)
    if cutoff:
        lines.append(f"references on the same queries: {describe_references(references, int(cutoff))}")
    rows = [[r.info.run_name, r.data.tags.get(Tag.STATUS, "?") + (" (collapsed)" if r.data.tags.get(
        Tag.COLLAPSED) == "True" else ""), _value(r.data.metrics.get(objective)),
             _value(r.data.metrics.get("mapall_mean")), int(r.data.metrics.get("epoch", 0)), r.info.run_id]
            for r in trials]
    head = ["trial", "status", metric, "mAP@ALL mean(I->T, T->I)", "epochs", "run id"]
    lines.append((markdown_table if markdown else text_table)(head, rows))
    return lines


def ablation_report(tracker: Any, name: str) -> str:
    """The report (results.md) the newest ablation `name` logged on its parent run."""
    parent = _parent(tracker, "ablation", name)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = tracker.download(parent.info.run_id, "results.md", folder)
        except Exception as err:  # MLflow raises several kinds for a missing artifact
            raise UserError(f"ablation '{name}' (run {parent.info.run_id}) has no results.md yet: it did not finish "
                            f"({type(err).__name__})") from None
        return Path(path).read_text()


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"

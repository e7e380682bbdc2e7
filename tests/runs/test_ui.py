"""The MLflow UI as a user meets it after a real search: an MLflow server as docker-compose.yml runs it (`--app-name
agch`), a fresh headless Chromium on the link the search printed, on the experiment's own page (what MLflow's home
page links to) and on the search's parent run, reading the text in the window (tests/browser.py).

Set AGCH_UI_SCREENSHOTS=DIR to also save the windows as DIR/runs-view.png, experiment-page.png, parent-run.png (the
screenshots in docs/search.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from agch.runs import tracking, ui
from agch.cli.search import main
from tests.browser import CHROMIUM, first_screen
from tests.services import start_mlflow
from tests.experiments.test_search_run import SPACE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's package)")]


ASSISTANT = "Ask questions about your experiments"
"""The first line of MLflow 3.17's assistant chat panel."""


def shot(name: str) -> Path | None:
    folder = os.environ.get("AGCH_UI_SCREENSHOTS")
    return Path(folder).resolve() / name if folder else None


def test_a_search_tells_its_winner_on_the_first_screen_of_every_page_it_links(
        ray_session, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    server, uri = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
    try:
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(dict(SPACE, parameters={**SPACE["parameters"], "gamma_t": {
            "low": 0.2, "high": 2.0}}, trials=4), sort_keys=False))
        assert main(["run", str(space), "--data", str(tiny_dataset), "--name", "ui", "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        link = re.search(r"MLflow UI: (\S+)", out).group(1)
        summary_page = re.search(r"the summary \(the parent run's description\): (\S+)", out).group(1)
        tracker = tracking.Tracker(uri, "agch-search")
        (parent,) = tracker.runs("tags.`agch.kind` = 'search'")
        best = tracker.run(parent.data.tags["agch.best_run"])
        winner = best.info.run_name  # 't2 δ=0.0563 γv=3.62 γt=1.45'
        value = best.data.metrics["map50_mean"]
        number, delta, gamma_v, gamma_t = re.fullmatch(r"(t\d+) δ=(\S+) γv=(\S+) γt=(\S+)", winner).groups()
        others = [r.info.run_name for r in tracker.runs(ui.runs_filter("ui"))
                  if r.info.run_id != best.info.run_id]
        test_run = next(r.info.run_name for r in tracker.runs("tags.`agch.role` = 'test'"))

        # the printed link: this search's trials only, best first, with their objective and δ, γv, γt as columns
        text = first_screen(link, until=(winner, "gamma_t"), screenshot=shot("runs-view.png"))
        assert "Run Name" in text and "Overview" not in text and "Traces\n0" not in text  # the runs table
        columns = ("map50_mean", "delta", "gamma_v", "gamma_t", "epoch", "agch.status", "mapall_mean")
        assert list(columns) == [c for c in text.splitlines() if c in columns]  # every column of the view, in order
        assert ASSISTANT not in text  # the app keeps MLflow's assistant panel from taking a quarter of the window
        assert text.index(winner) < min(text.index(name) for name in others)  # every trial, the winner first
        row = text[text.index(winner):].splitlines()
        assert f"{value:.4f}"[:5] in " ".join(row[:6])  # its objective in its row (MLflow rounds to 3-4 digits)
        assert test_run not in text and "ui\n" not in text  # neither the test run nor the parent is a trial

        # the experiment's own page, as MLflow's home page links it: the runs table, the winner in its description
        text = first_screen(f"{uri}/#/experiments/{tracker.experiment_id}", until=("newest search ui", "Run Name"),
                            screenshot=shot("experiment-page.png"))
        assert "Run Name" in text and "Overview" not in text and "Detect Issues" not in text and ASSISTANT not in text
        headline = next(line for line in text.splitlines() if line.startswith("newest search ui"))
        assert f"newest search ui: best trial {winner}: mAP@50 mean(I->T, T->I) {value:.4f}" in headline
        assert all(f"{symbol}={number_}" in headline for symbol, number_ in (("δ", delta), ("γv", gamma_v),
                                                                             ("γt", gamma_t)))

        # the parent run's page: its description opens on the winner (the test-query figures follow, under MLflow's
        # "Show more" fade)
        text = first_screen(summary_page, until=("best trial",), screenshot=shot("parent-run.png"))
        lines = text.splitlines()
        assert any(line.startswith(f"best trial {winner}: mAP@50 mean(I->T, T->I) {value:.4f}") for line in lines), text
        assert number == parent.data.tags["agch.best_trial"]
    finally:
        server.stop()

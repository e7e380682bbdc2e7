"""The MLflow UI as a user meets it: a real server, headless Chromium on the link the CLIs print.

Set AGCH_UI_SCREENSHOTS=DIR to also save the page as DIR/runs-view.png (the screenshot in docs/search.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agch import config as cfg
from agch.tracking import Tracker, ui_link
from agch.trial import TRIAL_NUMBER, RunContext, run_name
from tests.services import start_mlflow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's package)")]


def render(url: str, *extra: str) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time: no sleeping on real time)."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
            "--virtual-time-budget=20000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, check=True).stdout


def test_the_printed_link_opens_the_runs_table_filtered_to_the_search_best_first(tmp_path: Path) -> None:
    server, uri = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", tmp_path / "mlflow.log")
    try:
        tracker = Tracker(uri, "agch-search")
        parent = tracker.start_run("demo", tags={"agch.name": "demo"})
        ctx = RunContext(dataset="", tracking_uri=uri, experiment="agch-search", parent_run_id=parent, device="cpu",
                         base={}, group="demo", name="demo", kind="search")
        names = {}
        for number, (delta, gamma_v, objective) in enumerate([(0.034, 3.27, 0.61), (1.5, 0.8, 0.74),
                                                              (0.2, 2.0, 0.52)]):
            params = {TRIAL_NUMBER: number, "delta": delta, "gamma_v": gamma_v}
            names[objective] = run_name(ctx, params, cfg.apply(cfg.Config(), {"delta": delta, "gamma_v": gamma_v}))
            run = tracker.start_run(names[objective], tags={"agch.name": "demo"}, parent=parent)
            tracker.log_metrics(run, {"map50_mean": objective}, step=1)
        tracker.start_run("t0 other search", tags={"agch.name": "other"})
        link = ui_link(tracker, "demo", "map50_mean")
        assert link.startswith(f"{uri}/#/experiments/{tracker.experiment_id}/runs?")
        page = render(link, "--dump-dom")
        assert "Training runs" in page  # the runs table, not the GenAI overview (experiment tag mlflow.experimentKind)
        assert names[0.74] == "t1 δ=1.5 γv=0.8"
        order = [page.find(names[v]) for v in (0.74, 0.61, 0.52)]
        assert -1 < order[0] < order[1] < order[2], order  # every trial, sorted by the objective, best first
        assert "other search" not in page  # filtered to this search
        shots = os.environ.get("AGCH_UI_SCREENSHOTS")
        if shots:
            render(link, f"--screenshot={Path(shots).resolve() / 'runs-view.png'}")
    finally:
        server.stop()

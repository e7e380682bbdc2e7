"""A search and an ablation started by agch as it was before its subpackages (one flat package; the searcher an
OptunaSearch subclass) and interrupted, continued by agch as it is: Ray Tune's pickles name the old modules
(agch.runs.legacy maps them) and the old searcher's state (agch.runs.searcher upgrades it).

The old code is this repository's own commit LEGACY, exported with `git archive` and run in a subprocess with
PYTHONPATH pointing at it (its Ray workers inherit that); the test skips, saying why, where the history lacks it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from agch.runs.tracking import RetryingTracker
from agch.paths import default_tracking_uri
from tests.experiments.test_search_run import SPACE

LEGACY = "d84ced6a8cd567e97a7aba47f064cad94e74aee7"
"""The last commit of the flat layout (main before the move into subpackages)."""
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def legacy_tree(tmp_path_factory) -> Path:
    """The LEGACY commit's tree, exported into a temporary folder."""
    folder = tmp_path_factory.mktemp("legacy")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", LEGACY], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {LEGACY[:8]} (the flat layout) is not in this checkout's history: "
                    f"{archive.stderr.decode().strip()[:200]}")
    tar = folder / "legacy.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as files:
        files.extractall(folder / "tree", filter="data")
    return folder / "tree"


def interrupted_by_ctrl_c(legacy: Path, command: list[str], log: Path, done: object) -> None:
    """Run `python -m <command>` with the old code; Ctrl-C it once done() holds (at most 240 s)."""
    env = {**os.environ, "PYTHONPATH": str(legacy)}
    proc = subprocess.Popen([sys.executable, "-m", *command], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=legacy)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not done():
        time.sleep(0.5)
    assert proc.poll() is None, f"the old driver ended before it could be interrupted:\n{log.read_text()}"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, log.read_text()


def finished_runs(experiment: str, group_prefix: str) -> int:
    tracker = RetryingTracker(default_tracking_uri(), experiment)
    return sum(r.data.tags.get("agch.status") == "finished" and r.data.tags.get("agch.group", "").startswith(
        group_prefix) for r in tracker.runs("attributes.status = 'FINISHED'"))


def test_a_search_started_before_the_move_resumes_after_it(ray_session, legacy_tree: Path, tiny_dataset: Path,
                                                            tmp_path: Path, capsys) -> None:
    from agch.cli.search import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(dict(SPACE, scheduler={"name": "none", "epochs": 2}, concurrency=1, trials=4)))
    store = Path(os.environ["AGCH_HOME"])
    interrupted_by_ctrl_c(legacy_tree, ["agch.cli.search", "run", str(space), "--data", str(tiny_dataset),
                                        "--name", "old"], tmp_path / "old.log",
                          lambda: (store / "searches" / "old" / "search.json").exists()
                          and finished_runs("agch-search", "old") >= 1)
    before = finished_runs("agch-search", "old")
    assert main(["resume", "old"]) == 0, capsys.readouterr().out
    assert "search old finished" in capsys.readouterr().out
    tracker = RetryingTracker(default_tracking_uri(), "agch-search")
    runs = tracker.group_runs("old")
    study = optuna.load_study(study_name="old", storage=f"sqlite:///{store / 'optuna.db'}")
    assert len(runs) == 4 and {r.data.tags["agch.status"] for r in runs} == {"finished"} and before >= 1
    assert len({r.data.tags["agch.slot"] for r in runs}) == 4  # no trial got a second run
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    by_number = {t.number: t for t in study.trials}
    for run in runs:  # the old driver's trials and the new one's are the same Optuna trials
        trial = by_number[int(run.data.tags["agch.trial_number"])]
        assert trial.value == run.data.metrics["map50_mean"]
    assert len(tracker.group_runs("old.test")) == 1  # the test run of the chosen settings, by the new code


def test_an_ablation_started_before_the_move_resumes_after_it(ray_session, legacy_tree: Path, tiny_dataset: Path,
                                                               tmp_path: Path, capsys) -> None:
    from agch.cli.ablate import main
    from tests.experiments.test_ablation_run import TINY_ABLATION

    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**TINY_ABLATION, "name": "old-ablation", "fixes": ["balance"], "seeds": 2,
                                    "epochs": 3, "max_concurrent": 1, "dataset": str(tiny_dataset),
                                    "overrides": {**TINY_ABLATION["overrides"], "eval_every": 1}}))
    interrupted_by_ctrl_c(legacy_tree, ["agch.cli.ablate", str(path), "--experiment", "abl"], tmp_path / "old.log",
                          lambda: finished_runs("abl", "old-ablation") >= 1)
    assert main([str(path), "--experiment", "abl"]) == 0
    out = capsys.readouterr().out
    assert "resuming the interrupted run of this ablation" in out and "resuming Ray Tune experiment" in out
    tracker = RetryingTracker(default_tracking_uri(), "abl")
    children = [r for r in tracker.runs("attributes.status = 'FINISHED'") if "agch.identity" in r.data.tags]
    identities = [r.data.tags["agch.identity"] for r in children]
    assert len(identities) == len(set(identities)) == 4  # every cell × seed once
    (parent,) = tracker.runs("tags.`agch.kind` = 'ablation'")
    assert parent.info.status == "FINISHED"

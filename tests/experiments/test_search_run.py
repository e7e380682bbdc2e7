"""End-to-end searches on a tiny synthetic dataset (CPU, real Ray, MLflow and Optuna stores under a tmp AGCH_HOME).

MLflow and the Optuna study must hold the same trials; ASHA must stop some; Ctrl-C and a killed driver must leave a
search that `resume` finishes without rerunning or duplicating anything.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from agch import config as cfg
from agch.runs import driver
from agch.experiments import search
from agch.runs import tracking, ui
from agch.experiments.search_space import SHIPPED_DIR, load_space
from agch.cli.search import main
from agch.cli.train import build_parser as train_parser
from agch.cli.common import config_from_args
from agch.errors import UserError
from agch.paths import default_tracking_uri
from tests.conftest import TINY

pytestmark = pytest.mark.slow
# Tiny networks; text_input on, because without it the paper's text codes collapse on this set within an epoch.
FIXED = {k: v for k, v in TINY.items() if k not in ("epochs", "eval_every")} | {"fixes.text_input": True}
SPACE = {
    "preset": "paper",
    "fixed": FIXED,
    "parameters": {"delta": {"low": 0.001, "high": 10, "log": True}, "gamma_v": {"low": 0.5, "high": 4}},
    "sampler": {"name": "tpe", "seed": 0, "options": {"n_startup_trials": 2}},
    "scheduler": {"name": "asha", "epochs": 3, "grace_period": 1, "reduction_factor": 4},
    "trials": 6,
    "concurrency": 2,
    "resources": {"cpus": 1},
}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def stores(name: str) -> tuple[tracking.RetryingTracker, list, optuna.Study]:
    """The search's MLflow child runs (after its parent) and its Optuna study, from the default embedded stores."""
    tracker = tracking.RetryingTracker(default_tracking_uri(), "agch-search")
    study = optuna.load_study(study_name=name, storage=search.default_storage_url())
    return tracker, tracker.group_runs(name), study


def parent_of(tracker: tracking.RetryingTracker, name: str) -> object:
    parents = tracker.client.search_runs([tracker.experiment_id], f"tags.`agch.kind` = 'search' and "
                                                                  f"tags.`agch.group` = '{name}'")
    assert len(parents) == 1
    return parents[0]


def test_search_end_to_end(ray_session, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", str(write(tmp_path, SPACE)), "--data", str(tiny_dataset), "--name", "e2e"]) == 0
    out = capsys.readouterr().out
    assert "search e2e finished" in out and "mAP@50 mean(I->T, T->I), 16 bits" in out
    assert "mlflow ui --app-name agch --backend-store-uri sqlite:///" in out
    assert "/runs?viewStateShareKey=e2e&workflowType=machine_learning" in out
    # a line before each step that takes seconds; the live table's header and how many trials have ended
    for step in ("opening the MLflow tracking store", "checking the dataset", "starting a local Ray",
                 "training the chosen settings t", "writing the plots"):
        assert step in out, step
    assert "trial  state" in out and "6/6 trials ended" in out

    tracker, runs, study = stores("e2e")
    parent = parent_of(tracker, "e2e")
    assert len(runs) == 6 and len({r.data.tags["agch.trial_id"] for r in runs}) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    # trials are scored on validation queries; the chosen settings once on the test queries, in a run of their own
    assert {r.data.params["eval_split"] for r in runs} == {"validation"}
    test_runs = tracker.group_runs("e2e.test")
    assert len(test_runs) == 1 and test_runs[0].data.params["eval_split"] == "test"
    assert parent.data.metrics["test_map50_i2t"] == pytest.approx(test_runs[0].data.metrics["map50_i2t"])
    assert "test queries (100 vs 500 database)" in parent.data.tags["agch.test_protocol"]
    assert "validation queries (100 vs 400 database)" in out and "test queries, scored once for these settings" in out
    assert {"reference_random_map50", "reference_cca_itq_mapall_i2t"} <= set(parent.data.metrics)
    assert len({frozenset(r.data.params) for r in runs}) == 1  # the same param names in every trial
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["epochs"] == "3"
    # the study names its objective with the protocol (optuna-dashboard shows it instead of "Objective 0")
    assert study.metric_names == ["mAP@50 mean(I->T, T->I), 16 bits, validation queries, synthetic data"]
    assert study.user_attrs["protocol"] == parent.data.tags["agch.protocol"]
    assert study.user_attrs["mlflow_parent_run"].endswith(f"/runs/{parent.info.run_id}?workflowType=machine_learning")

    # one record of each trial: the value that decided its fate is what Optuna and MLflow both hold
    optuna_of = {tid: t for t in study.trials for tid in t.user_attrs["tune_trial_ids"]}
    assert len(study.trials) == 6 and set(optuna_of) == {r.data.tags["agch.trial_id"] for r in runs}
    expected_state = {"finished": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}
    for run in runs:
        trial = optuna_of[run.data.tags["agch.trial_id"]]
        status = run.data.tags["agch.status"]
        assert json.loads(run.data.tags["agch.trial_params"]) == {**trial.params, "trial_number": trial.number}
        assert {k: float(run.data.params[k]) for k in trial.params} == pytest.approx(trial.params)
        assert trial.state.name == expected_state[status], run.data.tags
        assert trial.value == run.data.metrics["map50_mean"], (status, trial.intermediate_values)
        assert max(trial.intermediate_values) == run.data.metrics["epoch"]
        # stopped is not failed: ran as asked, FINISHED, with the scheduler's reason
        assert run.info.status == {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}[status]
        if status == "stopped":
            assert run.data.tags["agch.reason"] == f"early-stopped by the scheduler after epoch " \
                                                   f"{int(run.data.metrics['epoch'])}"
        # one name everywhere: t<Optuna number> in the run's name and on the Optuna trial, with its run
        assert trial.user_attrs["name"] == f"t{trial.number}"
        assert trial.user_attrs["mlflow_run_ids"] == [run.info.run_id]
        assert trial.user_attrs["mlflow_runs"][0].endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning")
        assert "locked" not in run.data.tags["agch.reason"]  # concurrent trials share the SQLite store
        # named by what varied (the paper's order: δ, then γv, γt); tagged so the UI can filter and tell them apart
        assert run.info.run_name == f"t{trial.number} δ={trial.params['delta']:.3g} γv={trial.params['gamma_v']:.3g}"
        assert (run.data.tags["agch.name"], run.data.tags["agch.trial_number"]) == ("e2e", str(trial.number))
        assert run.data.tags["agch.role"] == "trial"
        assert run.data.tags["agch.protocol"].startswith("16 bits, standard split, validation queries")
    statuses = [r.data.tags["agch.status"] for r in runs]
    assert "stopped" in statuses and "finished" in statuses  # ASHA stopped some, the best ran to the end
    assert all(r.data.metrics["epoch"] < 3 for r in runs if r.data.tags["agch.status"] == "stopped")

    # the test run is apart: its own name and role, outside the printed link's filter
    best = study.best_trial
    (test,) = test_runs
    assert test.info.run_name.startswith(f"test: chosen settings t{best.number} δ=") and \
        test.data.tags["agch.role"] == "test"
    assert {r.info.run_id for r in tracker.runs(ui.runs_filter("e2e"))} == {r.info.run_id for r in runs}
    view = json.loads(tracker.experiment_tags()[ui.VIEW_TAG + "e2e"])
    assert view["searchFilter"] == ui.runs_filter("e2e") and view["orderByKey"] == "metrics.`map50_mean`"
    assert view["selectedColumns"] == ["metrics.`map50_mean`", "params.`delta`", "params.`gamma_v`", "metrics.`epoch`",
                                       "tags.`agch.status`", "metrics.`mapall_mean`"]
    best_run = next(r for r in runs if optuna_of[r.data.tags["agch.trial_id"]].number == best.number)
    assert parent.data.tags["agch.best_trial"] == f"t{best.number}"
    assert parent.data.tags["agch.best_run"] == best_run.info.run_id
    assert f"best trial: {best_run.info.run_name} (map50_mean {best.value:.4f}" in out
    assert f"its MLflow run: http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/" \
           f"{best_run.info.run_id}?workflowType=machine_learning" in out
    assert f"Optuna trial {best.number} of study 'e2e'" in out

    artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "search.json", "best_config.yaml", "best_trial.json", "trials.csv",
            "optimization_history.png"} <= artifacts
    if statuses.count("finished") >= 2:
        assert {"param_importances.png", "contour.png"} <= artifacts
    assert main(["show", "e2e"]) == 0  # the same trials, read back from the tracking store alone
    shown = capsys.readouterr().out
    order = sorted(runs, key=lambda r: -r.data.metrics["map50_mean"])
    assert [shown.index(r.info.run_name + " ") for r in order] == sorted(shown.index(r.info.run_name + " ")
                                                                          for r in order)
    assert shown.startswith(f"best trial {best_run.info.run_name}: mAP@50 mean(I->T, T->I) {best.value:.4f}")
    assert "the chosen settings on the test queries, scored once: mAP@50 I->T" in shown
    assert "every mAP is mAP@50 mean(I->T, T->I), 16 bits" in shown and test.info.run_name in shown
    note = tracker.run(parent.info.run_id).data.tags["mlflow.note.content"]  # the parent's description
    assert note.startswith(f"best trial **{best_run.info.run_name}**: mAP@50 mean(I->T, T->I) **{best.value:.4f}**")
    assert "the summary (the parent run's description)" in out
    # the experiment's description (the first thing its page shows) names the newest search's winner
    experiment_note = tracker.experiment_tags()["mlflow.note.content"]
    assert experiment_note.startswith(f"newest search e2e: best trial **{best_run.info.run_name}**")
    assert float(parent.data.tags["agch.best.delta"]) == pytest.approx(best.params["delta"])

    # trials.csv agrees with the description table: each trial's objective, status and epochs
    table = tracker.client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    header, *rows = list(csv.reader(Path(table).read_text().splitlines()))
    assert header[:3] == ["trial", "status", "epochs"] and "mAP@50 mean(I->T, T->I)" in header
    assert "run_ids" in header and not [h for h in header if h.startswith(("value", "system_attrs", "user_attrs"))]
    described = {line.split(" | ")[0].lstrip("| ").split(" ")[0]: line.split(" | ")[1:5]
                 for line in note.splitlines() if re.match(r"\| t\d+ ", line)}
    assert len(rows) == len(described) == 6
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        status, value, _, epochs = described[cells["trial"]]
        assert (cells["status"], f"{float(cells['mAP@50 mean(I->T, T->I)']):.4f}", cells["epochs"]) == (
            status, value, epochs)
        assert cells["run_ids"] in {r.info.run_id for r in runs}
    best_yaml = Path(os.environ["AGCH_HOME"]) / "searches" / "e2e" / "best_config.yaml"
    _, trained = config_from_args(train_parser().parse_args(["--config", str(best_yaml)]))
    assert trained.delta == pytest.approx(best.params["delta"])
    assert trained.gamma_v == pytest.approx(best.params["gamma_v"])
    assert trained.bits == 16 and trained.epochs == 3 and trained.fixes.text_input and trained.eval_split == "test"


def test_epochs_without_evaluation_do_not_end_the_search(ray_session, tiny_dataset: Path, tmp_path: Path,
                                                         capsys) -> None:
    space = dict(SPACE, fixed={**FIXED, "eval_every": 2}, scheduler={"name": "none", "epochs": 2}, trials=1)
    assert main(["run", str(write(tmp_path, space)), "--data", str(tiny_dataset), "--name", "sparse"]) == 0
    out = capsys.readouterr().out
    assert "search sparse finished: 1 finished, 0 stopped, 0 failed" in out, out


def test_ctrl_c_then_kill_then_resume_reruns_nothing(ray_session, tiny_dataset: Path, tmp_path: Path) -> None:
    space = dict(SPACE, scheduler={"name": "none", "epochs": 2}, concurrency=1)
    command = [sys.executable, "-m", "agch.cli.search", "run", str(write(tmp_path, space)), "--data",
               str(tiny_dataset), "--name", "rk"]
    log = tmp_path / "driver.log"

    def driver(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(args, stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ))

    def finished() -> int:
        if not (Path(os.environ["AGCH_HOME"]) / "searches" / "rk" / "search.json").exists():
            return 0  # the driver has not created the stores yet; never race it at that
        runs = tracking.RetryingTracker(default_tracking_uri(), "agch-search").group_runs("rk")  # MLflow only: the
        return sum(r.data.tags.get("agch.status") == "finished" for r in runs)  # study may not exist yet

    def wait_finished(proc: subprocess.Popen, count: int) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if finished() >= count:
                return
            time.sleep(0.5)
        raise AssertionError(f"no {count} finished trials in time:\n{log.read_text()}")

    first = driver(command)
    wait_finished(first, 1)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    assert first.wait(120) == 130, log.read_text()
    assert "agch-search resume rk" in log.read_text()
    tracker, runs, _ = stores("rk")
    assert parent_of(tracker, "rk").info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]

    second = driver([sys.executable, "-m", "agch.cli.search", "resume", "rk"])
    wait_finished(second, finished() + 1)
    second.kill()  # the driver dies without a chance to clean up; its local Ray goes with it
    second.wait(60)
    time.sleep(2)
    done = {r.info.run_id: (r.info.end_time, len(tracker.client.get_metric_history(r.info.run_id, "loss_total")))
            for r in stores("rk")[1] if r.info.status == "FINISHED"}
    assert len(done) >= 2

    assert main(["resume", "rk"]) == 0
    tracker, runs, study = stores("rk")
    # A trial the killed driver had just started is continued in its own run by the trial that replaces it.
    assert not [r for r in runs if r.data.tags["agch.status"] == "lost"]
    assert len(runs) == 6 and len({r.data.tags["agch.slot"] for r in runs}) == 6  # no trial has two runs
    for run_id, (end_time, epochs_logged) in done.items():  # finished before the kill: not trained again
        run = tracker.client.get_run(run_id)
        assert run.info.end_time == end_time
        assert len(tracker.client.get_metric_history(run_id, "loss_total")) == epochs_logged
    assert {r.data.tags["agch.status"] for r in runs} <= {"finished", "failed"}
    assert parent_of(tracker, "rk").info.status == "FINISHED"
    assert len(study.trials) == 6 and not [t for t in study.trials if t.state.name == "RUNNING"]
    optuna_of = {tid: t for t in study.trials for tid in t.user_attrs.get("tune_trial_ids", [])}
    assert sorted(optuna_of[r.data.tags["agch.trial_id"]].number for r in runs) == list(range(6))
    for run in runs:  # each run is its Optuna trial's: same settings, same number
        trial = optuna_of[run.data.tags["agch.trial_id"]]
        assert json.loads(run.data.tags["agch.trial_params"])["trial_number"] == trial.number
        assert float(run.data.params["delta"]) == pytest.approx(trial.params["delta"])


@pytest.mark.parametrize("stem", sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))
def test_every_shipped_space_runs_one_tiny_trial(ray_session, tiny_dataset: Path, stem: str) -> None:
    searched = {p.name for p in load_space(f"spaces/{stem}.yaml").parameters}
    small = {k: v for k, v in FIXED.items() if k not in searched}
    space = load_space(f"spaces/{stem}.yaml", layers=[cfg.Layer(small, "--set")], trials=1, epochs=1,
                       dataset=tiny_dataset)
    report = search.start(space, name=stem, device="cpu")
    assert not report.interrupted and len(report.outcomes) == space.seeds
    assert all(o.status in ("finished", "failed") and o.run_id and o.epochs == 1 for o in report.outcomes)
    tracker, runs, study = stores(stem)
    assert len(study.trials) == 1 and len(runs) == space.seeds
    if space.seeds > 1:  # one suggestion, trained with consecutive seeds; Optuna gets their mean
        assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(space.seeds))
        if study.trials[0].state.name == "COMPLETE":
            mean = sum(r.data.metrics["map50_mean"] for r in runs) / len(runs)
            assert study.trials[0].value == pytest.approx(mean)


def test_two_objectives_give_a_pareto_front(ray_session, tiny_dataset: Path, tmp_path: Path) -> None:
    doc = dict(SPACE, objective={"metrics": ["map50_i2t", "map50_t2i"]}, scheduler={"name": "none", "epochs": 1},
               trials=3)
    space = load_space(str(write(tmp_path, doc)), dataset=tiny_dataset)
    report = search.start(space, name="pareto", device="cpu")
    study = stores("pareto")[2]
    assert len(study.directions) == 2 and report.best is not None
    assert set(report.best["values"]) == {"map50_i2t", "map50_t2i"}
    assert report.best["optuna_trial"] in report.best["pareto_front"]


def test_more_gpus_than_exist_fails_before_anything_is_recorded(ray_session, tiny_dataset: Path, tmp_path: Path,
                                                                 capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r"each trial asks for 1 GPU\(s\) but this machine has 0"):
        driver.start_ray(None, {"cpu": 1, "gpu": 1})
    path = write(tmp_path, dict(SPACE, resources={"cpus": 1, "gpus": 1}))
    assert main(["run", str(path), "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lower resources.gpus" in err
    tracker = tracking.RetryingTracker(default_tracking_uri(), "agch-search")
    assert tracker.client.search_runs([tracker.experiment_id]) == []


def test_interrupted_trials_are_closed_not_left_running(ray_session, tiny_dataset: Path, tmp_path: Path) -> None:
    # far more trials than 4 s can hold, however fast this machine is: the budget always ends the search
    doc = dict(SPACE, scheduler={"name": "none", "epochs": 3}, time_budget="4s", trials=1000)
    report = search.start(load_space(str(write(tmp_path, doc)), dataset=tiny_dataset), name="budget")
    assert report.interrupted  # the time budget ended it: resumable, like Ctrl-C
    tracker, runs, _ = stores("budget")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # no scheduler: a trial the budget ended is interrupted (KILLED, resumable), never "stopped" (FINISHED)
    assert {r.data.tags["agch.status"] for r in runs} <= {"finished", "interrupted"}
    assert all(r.info.status == "KILLED" for r in runs if r.data.tags["agch.status"] == "interrupted")
    assert parent_of(tracker, "budget").data.tags["agch.search_state"] == "interrupted"

"""agch.runs.driver: trial configs, the locked-SQLite retry, and a Tune grid with one failing trial (the ablation's
use)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agch import config as cfg
from agch.runs import driver
from agch.runs import tracking
from agch.runs import context as trial
from agch.errors import UserError
from agch.runs.tracking import Tracker
from tests.conftest import TINY


def context(tracking_uri: str, dataset: Path, parent: str, group: str = "grid", **base: object) -> trial.RunContext:
    # text_input on: without it the paper's text codes collapse on this tiny set (the debugging log's story)
    config = cfg.apply(cfg.preset("paper"), {**TINY, "epochs": 2, "eval_every": 1, "fixes.text_input": True, **base})
    return trial.RunContext(dataset=str(dataset), tracking_uri=tracking_uri, experiment="runner-test",
                             parent_run_id=parent, device="cpu", base=cfg.to_flat(config), group=group)


def test_trial_config_applies_params_fixes_and_seed_offsets(tiny_dataset: Path) -> None:
    ctx = context("sqlite:///unused.db", tiny_dataset, "p", seed=3)
    config = trial.trial_config(ctx, {"delta": "0.5", "fixes": {"alignment": True}, "fixes.text-input": "on"})
    assert (config.delta, config.fixes.alignment, config.fixes.text_input, config.seed) == (0.5, True, True, 3)
    assert trial.trial_config(ctx, {trial.SEED_OFFSET: 2}).seed == 5
    with pytest.raises(UserError, match="unknown config key 'dleta'"):
        trial.trial_config(ctx, {"dleta": 1})


def test_trial_slot_names_a_place_not_a_tune_trial(tiny_dataset: Path) -> None:
    ctx = context("sqlite:///unused.db", tiny_dataset, "p")
    params = {"delta": 0.5, trial.TRIAL_NUMBER: 3}
    assert trial.trial_slot(ctx, dict(reversed(params.items()))) == trial.trial_slot(ctx, params)
    assert trial.trial_slot(ctx, {**params, trial.TRIAL_NUMBER: 4}) != trial.trial_slot(ctx, params)
    other_parent = context("sqlite:///unused.db", tiny_dataset, "q")
    assert trial.trial_slot(other_parent, params) != trial.trial_slot(ctx, params)
    assert trial.trial_config(ctx, params).delta == 0.5  # the trial number is bookkeeping, not a config key


def test_runs_of_trials_tune_no_longer_knows_are_tagged_lost(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.RetryingTracker(uri, "runner-test")
    ctx = context(uri, tiny_dataset, tracker.start_run("parent"))
    ids = {}
    for trial_id in ("kept", "gone", "errored"):
        ids[trial_id] = tracker.start_run(trial_id, tags={"agch.group": ctx.group, "agch.trial_id": trial_id},
                                          parent=ctx.parent_run_id)
    driver.mark_lost(ctx, {"kept", "errored"})
    driver.close_unfinished(ctx, {"errored": ("failed", "trial process failed: MlflowException: API request failed")})
    gone, kept, errored = (tracker.client.get_run(ids[t]) for t in ("gone", "kept", "errored"))
    assert (gone.info.status, gone.data.tags["agch.status"]) == ("KILLED", "lost")
    assert (kept.info.status, kept.data.tags["agch.status"]) == ("KILLED", "interrupted")
    assert (errored.info.status, errored.data.tags["agch.status"]) == ("FAILED", "failed")
    assert errored.data.tags["agch.reason"].endswith("API request failed")
    assert [o.trial_id for o in driver.outcomes(ctx)] == ["kept", "errored"]


@pytest.mark.parametrize("call", ["log_metrics", "group_runs", "client.search_runs"])
def test_tracker_calls_wait_out_a_locked_sqlite_store(tmp_path: Path, monkeypatch, call: str) -> None:
    """Another writer holds the database past SQLite's own busy timeout; it lets go only once the tracker has met
    the lock and backs off (its sleep releases the lock), so nothing here depends on how long anything takes. The
    same for a write, a named query and a call through the raw MlflowClient (all MLflow calls go through the
    adapter's retry)."""
    import types

    db = tmp_path / "mlflow.db"
    tracker = tracking.RetryingTracker(f"sqlite:///{db}", "locks")
    run_id = tracker.start_run("r")
    locked, release, released = threading.Event(), threading.Event(), threading.Event()
    backoffs: list[float] = []

    def hold_lock() -> None:
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(120)
        blocker.rollback()
        blocker.close()
        released.set()

    def backoff(seconds: float) -> None:  # the tracker met "database is locked" and backs off
        backoffs.append(seconds)
        release.set()
        released.wait(120)

    monkeypatch.setattr(tracking, "time", types.SimpleNamespace(sleep=backoff, monotonic=time.monotonic,
                                                                 time=time.time))
    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    if call == "log_metrics":
        tracker.log_metrics(run_id, {"m": 1.0}, step=0)
    elif call == "group_runs":
        assert tracker.group_runs("no such group") == []
    else:
        assert [r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id])] == [run_id]
    holder.join()
    assert len(backoffs) == 1 and 0 < backoffs[0] <= 4.0  # it met the lock once, backed off, and got through
    expected = {"m": 1.0} if call == "log_metrics" else {}
    assert Tracker(f"sqlite:///{db}", "locks").client.get_run(run_id).data.metrics == expected


@pytest.mark.slow
def test_grid_trials_record_one_run_each_and_a_failure_does_not_stop_the_rest(ray_session, tiny_dataset: Path,
                                                                              tmp_path: Path) -> None:
    from ray import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.RetryingTracker(uri, "runner-test")
    parent = tracker.start_run("grid")
    ctx = context(uri, tiny_dataset, parent)
    seen: list[str] = []
    found = driver.run_trials(ctx, param_space={"lr_text": tune.grid_search([0.01, 1e12])}, metric="epoch",
                              mode="max", resources={"cpu": 1}, max_concurrent=2, storage_dir=tmp_path / "tune",
                              name="grid", on_result=lambda trial_id, params, result: seen.append(trial_id))
    by_lr = {o.params["lr_text"]: o for o in found}
    assert sorted(by_lr) == [0.01, 1e12]
    assert by_lr[0.01].status == "finished", by_lr[0.01].reason
    assert by_lr[0.01].epochs == 2 and "map50_mean" in by_lr[0.01].metrics
    assert by_lr[1e12].status == "failed" and "non-finite loss" in by_lr[1e12].reason
    assert by_lr[0.01].trial_id in seen
    runs = {r.info.run_id: r for r in tracker.group_runs("grid")}
    assert set(runs) == {o.run_id for o in found}
    assert {r.info.status for r in runs.values()} == {"FINISHED", "FAILED"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs.values())
    assert len({frozenset(r.data.params) for r in runs.values()}) == 1  # the same param names in every trial
    # trials of a few seconds end before their first checkpoint is due (trial.checkpoint_period, 30 s)
    assert not list((tmp_path / "tune" / "grid").glob("*/checkpoint_*"))


def test_the_local_ray_starts_no_idle_workers_ahead() -> None:
    """driver.LOCAL_RAY: trials run in actors with processes of their own, so idle workers started with Ray would
    only take CPU. A fresh process, because the session's Ray may have run trials (which end idle workers) already."""
    check = """if True:
        import os, time
        from agch.runs import driver
        from tests.services import children

        driver.start_ray(None, {"cpu": 1})
        raylets = [pid for pid, command in children({os.getpid()}).items() if command.endswith("raylet")]
        time.sleep(3)  # prestarted workers register while Ray starts; give a slow machine time
        print("raylets", len(raylets), "idle", sum(c.startswith("ray::IDLE") for c in children(set(raylets)).values()))
    """
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raylets 1 idle 0" in result.stdout, result.stdout + result.stderr[-2000:]


def test_an_error_met_while_the_tracking_server_is_down_says_how_to_continue() -> None:
    from agch.runs.tracking import outage_hint
    from tests.services import free_port

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError, match=r"stopped answering .*Once it answers again: agch-search resume s1$") as info:
        with outage_hint(down, "agch-search resume s1"):
            raise ConnectionError("API request to endpoint /api/2.0/mlflow/runs/log-batch failed")
    assert isinstance(info.value.__cause__, ConnectionError)  # the original error stays attached
    with pytest.raises(ValueError, match="not an outage"):  # an embedded store has no outage to report
        with outage_hint("sqlite:///x.db", "agch-search resume s1"):
            raise ValueError("not an outage")


def test_tracking_wait_is_read_from_the_environment_and_checked(monkeypatch) -> None:
    monkeypatch.setenv(tracking.TRACKING_WAIT_S, "42")
    assert tracking.tracking_wait_s() == 42
    monkeypatch.setenv(tracking.TRACKING_WAIT_S, "ten minutes")
    with pytest.raises(UserError, match="AGCH_TRACKING_WAIT_S must be a number of seconds, got 'ten minutes'"):
        tracking.tracking_wait_s()


def test_checkpoint_period_is_read_from_the_environment_and_checked(monkeypatch) -> None:
    monkeypatch.delenv(trial.CHECKPOINT_ENV, raising=False)
    assert trial.checkpoint_period() == 30
    monkeypatch.setenv(trial.CHECKPOINT_ENV, "0")
    assert trial.checkpoint_period() == 0
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv(trial.CHECKPOINT_ENV, bad)
        with pytest.raises(UserError, match=rf"AGCH_CHECKPOINT_EVERY_S must be a number of seconds >= 0 .*got '{bad}'"):
            trial.checkpoint_period()
        with pytest.raises(UserError, match="AGCH_CHECKPOINT_EVERY_S"):  # refused before Ray starts
            driver.start_ray()


def test_a_check_before_starting_does_not_wait_for_an_unreachable_server(monkeypatch) -> None:
    from tests.services import free_port

    monkeypatch.setenv(tracking.TRACKING_WAIT_S, "600")
    started = time.monotonic()
    with pytest.raises(UserError, match="is unreachable"):
        tracking.RetryingTracker(f"http://127.0.0.1:{free_port()}", "x", wait=False)
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_collapsed_trial_finishes_with_its_value_and_can_stop_at_its_first_collapsed_evaluation(
        ray_session, tiny_dataset: Path, tmp_path: Path) -> None:
    """A quantization term 1000 times too strong pins every code to one corner within an epoch."""
    import dataclasses

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.RetryingTracker(uri, "runner-test").start_run("collapse")
    ctx = context(uri, tiny_dataset, parent, group="collapse", epochs=3, quant_weight=1000,
                  **{"fixes.quantization": True})
    found = {}
    for stop in (True, False):
        [found[stop]] = driver.run_trials(dataclasses.replace(ctx, stop_on_collapse=stop, group=f"collapse-{stop}"),
                                          param_space={}, metric="epoch", mode="max", resources={"cpu": 1}, max_concurrent=1,
                                          storage_dir=tmp_path / "tune", name=f"collapse-{stop}")
    for stop, outcome in found.items():
        assert outcome.status == "finished" and outcome.metrics["collapsed"] == 1.0, outcome
        assert "map50_mean" in outcome.metrics
    assert found[True].epochs == 1 and "stopped after epoch 1: codes collapsed" in found[True].reason
    assert found[False].epochs == 3 and not found[False].reason
    run = tracking.RetryingTracker(uri, "runner-test").client.get_run(found[True].run_id)
    assert (run.info.status, run.data.tags["agch.collapsed"]) == ("FINISHED", "True")

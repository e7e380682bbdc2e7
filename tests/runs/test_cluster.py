"""The scale-out topology, natively: PostgreSQL + an MLflow server on it + a two-node Ray cluster on 127.0.0.1.

The same CLI commands as on one machine, pointed at the services by --tracking-uri, --storage and --ray-address.
Then the faults: a worker node killed, the driver killed and resumed, the MLflow server stopped for a while.
Everything started here is stopped by PID (process group) at the end, even when a test fails.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests import services
from tests.conftest import FAULT_REPORTS

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not services.postgres_available(), reason="PostgreSQL server binaries not found")]

SPACE = {
    "description": "integration test: a tiny search over delta",
    "preset": "paper",
    "fixed": {"bits": 16, "text_hidden": 32, "gcn_hidden": 32, "eval_every": 1, "lr_image": 0.01},
    "parameters": {"delta": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
    "sampler": {"name": "random", "seed": 0},
    "scheduler": {"name": "none", "epochs": 3},
    "trials": 4,
    "concurrency": 2,
    "resources": {"cpus": 1, "gpus": 0},
    "objective": {"metric": "map50_mean", "mode": "max"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Yields the endpoints; stops every service it started, in reverse order, whatever happens."""
    tmp = tmp_path_factory.mktemp("cluster")
    ray_nodes: list[services.Process] = []
    state: dict = {}
    with services.postgres() as pg:
        try:
            state["mlflow"], uri = services.start_mlflow(f"{pg}/mlflow", tmp / "artifacts", tmp / "mlflow.log")
            head, address = services.start_ray_head(tmp / "ray-head.log", num_cpus=1)
            ray_nodes.append(head)
            ray_nodes.append(services.start_ray_worker(address, tmp / "ray-worker.log", num_cpus=1))
            state.update(tmp=tmp, pg=pg, uri=uri, storage=f"{pg}/optuna", address=address,
                         mlflow_port=int(uri.rsplit(":", 1)[1]))
            yield state
        finally:
            for proc in reversed(ray_nodes):
                # SIGINT: `ray start --head --block` took the whole 30-s wait on SIGTERM here (1.7 s on SIGINT)
                proc.stop(signal.SIGINT)
            if "mlflow" in state:  # the current server: a test may have restarted it
                state["mlflow"].stop()


def _cli(cluster, tool: str, *args: str, wait: bool = True, timeout: float = 600, env: dict | None = None):
    env = {**os.environ, **services.RAY_ENV, "AGCH_HOME": str(cluster["tmp"] / "home"), **(env or {})}
    cmd = [str(services.VENV_BIN / tool), *args, "--ray-address", cluster["address"]]
    if args[0] != "resume":  # a resumed search reads its stores from its own saved state
        cmd += ["--tracking-uri", cluster["uri"]]
    if args[0] == "run":
        cmd += ["--storage", cluster["storage"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _space(cluster, name: str, **changes) -> Path:
    path = cluster["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def _runs(cluster, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["uri"])
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _children(runs, group: str):
    return [r for r in runs if r.data.tags.get("agch.group") == group and "mlflow.parentRunId" in r.data.tags]


def _ended(runs) -> bool:
    """Every run closed: finished (collapsed codes included), or failed with its reason."""
    return all(r.info.status == "FINISHED" or (r.info.status == "FAILED" and r.data.tags.get("agch.reason"))
               for r in runs)


def _report(what: str, trials: int, runs, **extra) -> None:
    """One summary line: trials, runs, failures (FAILED runs), retries (runs continued by a later attempt), extra."""
    failures = sum(r.info.status == "FAILED" for r in runs)
    retries = sum(int(r.data.tags.get("agch.attempts", "1")) > 1 for r in runs)
    counts = {"trials": trials, "runs": len(runs), "failures": failures, "retries": retries, **extra}
    FAULT_REPORTS.append(f"[{what}] " + ", ".join(f"{k}={v}" for k, v in counts.items()))


def test_search_and_ablation_land_in_postgres_and_use_both_nodes(cluster, tiny_dataset):
    import optuna
    import sqlalchemy

    code, out = _cli(cluster, "agch-search", "run", str(_space(cluster, "s1")), "--data", str(tiny_dataset),
                     "--name", "cluster-s1")
    assert code == 0, out
    children = _children(_runs(cluster, "agch-search"), "cluster-s1")
    assert len(children) == 4 and _ended(children), [(r.info.status, r.data.tags.get("agch.reason")) for r in children]
    nodes = {r.data.tags.get("ray.node_id") for r in children}
    assert len(nodes) == 2, nodes  # trials ran on both nodes
    study = optuna.load_study(study_name="cluster-s1", storage=cluster["storage"])
    assert len(study.trials) == 4 and {t.number for t in study.trials} == {0, 1, 2, 3}
    with sqlalchemy.create_engine(f"{cluster['pg']}/mlflow").connect() as db:  # really in PostgreSQL
        stored = db.execute(sqlalchemy.text("select count(*) from runs")).scalar()
    assert stored >= 5

    code, out = _cli(cluster, "agch-ablate", "--experiment", "agch-ablate", "--fix", "alignment", "--seeds", "2",
                     "--epochs", "2", "--data", str(tiny_dataset), "--set", "bits=16", "--set", "text_hidden=32",
                     "--set", "gcn_hidden=32", "--name", "cluster-a1")
    assert code == 0, out
    ablation_runs = [r for r in _runs(cluster, "agch-ablate") if "mlflow.parentRunId" in r.data.tags]
    assert len(ablation_runs) == 4 and _ended(ablation_runs)
    _report("search+ablation", 4 + 4, children + ablation_runs, nodes=len(nodes))


def test_killing_a_worker_node_mid_search_retries_its_trials(cluster, tiny_dataset):
    extra = services.start_ray_worker(cluster["address"], cluster["tmp"] / "ray-extra.log", num_cpus=2)
    try:
        space = _space(cluster, "s2", trials=4, concurrency=4, scheduler={"name": "none", "epochs": 6})
        proc = _cli(cluster, "agch-search", "run", str(space), "--data", str(tiny_dataset), "--name", "cluster-s2",
                    wait=False)
        on_extra = lambda: [r.info.run_id for r in _children(_runs(cluster, "agch-search"), "cluster-s2")  # noqa: E731
                            if r.info.status == "RUNNING" and r.data.tags.get("ray.node_id") == extra.node_id]
        services.wait_for(on_extra, 240, "a trial running on the node to be killed")
        doomed = on_extra()
        extra.stop(signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        extra.stop()
    assert proc.returncode == 0, out
    children = _children(_runs(cluster, "agch-search"), "cluster-s2")
    per_trial = collections.Counter(r.data.tags["agch.slot"] for r in children)
    assert len(per_trial) == 4 and max(per_trial.values()) == 1  # one MLflow run per trial, retries included
    assert _ended(children), [(r.info.status, r.data.tags.get("agch.reason")) for r in children]
    retried = [r for r in children if int(r.data.tags.get("agch.attempts", "1")) > 1]
    seen = [(r.info.run_id, r.info.status, r.data.tags.get("agch.attempts"), r.data.tags.get("ray.node_id"))
            for r in children]
    assert {r.info.run_id for r in retried} >= set(doomed), (seen, doomed, extra.node_id)  # each ran again...
    assert all(r.data.tags["ray.node_id"] != extra.node_id for r in retried)  # ...on another node
    _report("worker killed", len(per_trial), children, on_killed_node=len(doomed))


def test_killing_the_driver_then_resume_reruns_nothing(cluster, tiny_dataset):
    space = _space(cluster, "s3", trials=4, concurrency=1, scheduler={"name": "none", "epochs": 3})
    proc = _cli(cluster, "agch-search", "run", str(space), "--data", str(tiny_dataset), "--name", "cluster-s3",
                wait=False)
    finished = lambda: [r for r in _children(_runs(cluster, "agch-search"), "cluster-s3")  # noqa: E731
                        if r.info.status == "FINISHED"]
    services.wait_for(lambda: len(finished()) >= 1, 300, "a finished trial")
    before = {r.info.run_id: r.info.end_time for r in finished()}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    code, out = _cli(cluster, "agch-search", "resume", "cluster-s3")
    assert code == 0, out
    children = _children(_runs(cluster, "agch-search"), "cluster-s3")
    per_trial = collections.Counter(r.data.tags["agch.slot"] for r in children)
    assert len(children) == 4 and len(per_trial) == 4 and _ended(children)  # no second run, none lost
    after = {r.info.run_id: r.info.end_time for r in children}
    assert all(after[run_id] == end for run_id, end in before.items())  # finished trials were not rerun
    import optuna

    study = optuna.load_study(study_name="cluster-s3", storage=cluster["storage"])
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3] and all(t.state.is_finished() for t in study.trials)
    _report("driver killed + resume", len(study.trials), children, finished_before=len(before))


OUTAGES = {  # name: (seconds down, environment of the search; trials get MLFLOW_* and AGCH_TRACKING_WAIT_S too)
    "brief": (8, {}),
    "outlasts-client-retries": (25, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}),
    "outlasts-the-wait": (25, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "AGCH_TRACKING_WAIT_S": "3"}),
}


@pytest.mark.parametrize("case", list(OUTAGES))
def test_mlflow_server_outage_loses_no_result(cluster, tiny_dataset, case):
    """The server is killed while two trials log, and restarted on the same port a while later.

    brief: MLflow's client retries through it. outlasts-client-retries: the client gives up at once, and every
    caller waits for the server (AGCH_TRACKING_WAIT_S, default 600 s): the search just finishes.
    outlasts-the-wait: calls fail after 3 s; a trial that cannot log ends in error (Tune retries it from its
    checkpoint on a cluster); the driver either finishes or stops with exit 2 and the resume command, which then
    completes the search. In every case each trial ends with one run, FINISHED with every epoch or FAILED with its
    reason, and nothing is left open.
    """
    outage_s, env = OUTAGES[case]
    name = f"cluster-s4-{case}"
    # every trial trains all 6 epochs, through the outage: a trial whose tiny codes collapse is not stopped early
    space = _space(cluster, name, trials=2, concurrency=2,
                   scheduler={"name": "none", "epochs": 6, "stop_on_collapse": False})
    proc = _cli(cluster, "agch-search", "run", str(space), "--data", str(tiny_dataset), "--name", name,
                wait=False, env=env)
    services.wait_for(lambda: len(_children(_runs(cluster, "agch-search"), name)) == 2, 240, "both trials running")
    cluster["mlflow"].stop(signal.SIGKILL)
    time.sleep(outage_s)  # the trials keep training into the outage
    restarted, _ = services.start_mlflow(f"{cluster['pg']}/mlflow", cluster["tmp"] / "artifacts",
                                         cluster["tmp"] / f"mlflow-{case}.log", port=cluster["mlflow_port"])
    cluster["mlflow"] = restarted
    out, _ = proc.communicate(timeout=600)
    resumed = proc.returncode != 0
    if resumed:
        assert case == "outlasts-the-wait", out
        assert proc.returncode == 2 and f"Once it answers again: agch-search resume {name}" in out, out
        code, out = _cli(cluster, "agch-search", "resume", name, env=env)
        assert code == 0, out
    children = _children(_runs(cluster, "agch-search"), name)
    statuses = collections.Counter(r.info.status for r in children)
    _report(f"mlflow outage {case}, {outage_s} s", 2, children, resumed=int(resumed),
            **{s.lower(): n for s, n in statuses.items()})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["uri"])
    assert len(children) == 2 and len({r.data.tags["agch.slot"] for r in children}) == 2, out
    for run in children:
        if case != "outlasts-the-wait" or run.info.status == "FINISHED":  # every metric, the outage's epochs too
            assert run.info.status == "FINISHED" and run.data.tags["agch.status"] == "finished", out
            assert "map50_mean" in run.data.metrics
            epochs = [m.step for m in client.get_metric_history(run.info.run_id, "loss_total")]
            assert sorted(set(epochs)) == list(range(1, 7)), epochs
        else:
            assert run.info.status == "FAILED" and "tracking server" in run.data.tags["agch.reason"], run.data.tags

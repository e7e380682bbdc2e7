"""agch-audit end to end: a real run on a file-order synthetic set, its codes under every protocol, bad input."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from agch.cli.audit import main as audit
from agch.cli.train import main as train
from agch.errors import UserError
from agch.data.splits import make_split
from agch.data.synth import build_synthetic_dataset
from tests.conftest import STRONG_IMAGES, TINY, one_line_error

TRAIN_ARGS = [arg for key, value in {**TINY, "epochs": 2}.items() for arg in ("--set", f"{key}={value}")]
N = 600  # file-order: train rows [0, 270), database [270, 540), queries [540, 600)


@pytest.fixture(scope="module")
def file_order(tmp_path_factory) -> dict[str, object]:
    """A file-order tiny synthetic set and one agch-train run on it, recorded in a module-wide SQLite store."""
    root = tmp_path_factory.mktemp("audit")
    data = build_synthetic_dataset(root / "fo.h5", seed=0, n=N, image=STRONG_IMAGES, split="file-order")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AGCH_HOME", str(root / "home"))
        assert train(["--data", str(data), *TRAIN_ARGS, "--tracking-uri", uri, "--device", "cpu"]) == 0
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("agch").experiment_id])
    return {"data": data, "uri": uri, "run": run, "root": root}


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_audit_of_a_file_order_run_shows_the_logs_protocol_beside_the_papers(file_order, tmp_path, capsys):
    run, uri = file_order["run"], file_order["uri"]
    assert audit([run.info.run_id, "--tracking-uri", uri, "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    qd = next(i for i, line in enumerate(lines) if line.startswith("file-order") and "database (270)" in line
              and "I->T" in line and "mAP@50 " in line)
    qq = lines[qd + 1]  # the query-vs-query row right below the mAP@50 query-vs-database row
    assert qq.startswith("file-order") and "other queries (59, self excluded)" in qq and "mAP@50" in qq
    assert "16 bits, dataset mirflickr-like-synthetic" in out and "synthetic parts: image,labels,text" in out
    assert "relevance = >= 1 shared label" in out

    table = rows_of((tmp_path / "audit.csv").read_text())
    own = {(r["ranking"], r["direction"], r["metric"]): float(r["map"]) for r in table
           if r["split"] == "file-order" and r["codes"] == "the run's codes"}
    assert len(own) == 2 * 2 * 3  # query vs database / query, I->T / T->I, mAP@50 / @100 / @ALL
    metrics = run.data.metrics
    # The same codes as the trainer scored them: its mAP@50 and its query-vs-query metric (the log's protocol).
    for d, direction in (("i2t", "I->T"), ("t2i", "T->I")):
        assert own[("query vs database", direction, "mAP@50")] == pytest.approx(metrics[f"map50_{d}"], abs=1e-12)
        assert own[("query vs database", direction, "mAP@ALL")] == pytest.approx(metrics[f"mapall_{d}"], abs=1e-12)
        log = own[("query vs query (self excluded)", direction, "mAP@ALL")]
        assert log == pytest.approx(metrics[f"mapall_qq_{d}"], abs=1e-12)
        assert log != own[("query vs database", direction, "mAP@50")]  # two measurements, two numbers
    delta = float(next(r["delta_vs_map50_query_vs_database"] for r in table if r["split"] == "file-order"
                       and r["ranking"].startswith("query vs query") and r["metric"] == "mAP@ALL"
                       and r["direction"] == "I->T"))
    assert delta == pytest.approx(own[("query vs query (self excluded)", "I->T", "mAP@ALL")]
                                  - own[("query vs database", "I->T", "mAP@50")])
    assert "query-vs-query mAP@ALL (the debugging log's protocol) I->T" in out

    # The other splits, re-encoded with the run's encoders.pt; what the model trained on is counted.
    assert {r["split"] for r in table} == {"file-order", "standard", "ucch"}
    assert all(r["codes"].startswith("re-encoded") for r in table if r["split"] != "file-order")
    standard = make_split("standard", N, seed=0, n_query=60, n_train=270)
    seen = int(np.isin(standard.query, np.arange(270)).sum())
    assert seen > 0 and f"re-encoded ({seen}/60 queries seen in training)" in out
    assert f"standard split: {seen} of its 60 test queries were training pairs" in out
    assert "encoders.pt re-encodes the run's own rows to 660 of 660 identical codes" in out
    assert "under the paper's (standard split, query vs database, mAP@50)" in out
    assert {r["bits"] for r in table} == {"16"} and {r["relevance"] for r in table} == {">= 1 shared label"}

    # Logged to the run, markdown and CSV.
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} == {"audit/audit.md", "audit/audit.csv"}
    logged = Path(client.download_artifacts(run.info.run_id, "audit/audit.csv", str(tmp_path / "dl"))).read_text()
    assert rows_of(logged) == table


def test_audit_of_downloaded_artifacts_and_of_codes_alone(file_order, tmp_path, capsys):
    client = MlflowClient(file_order["uri"])
    folder = tmp_path / "artifacts"
    folder.mkdir()
    for name in ("codes.npz", "protocol.json", "config.yaml", "encoders.pt"):
        client.download_artifacts(file_order["run"].info.run_id, name, str(folder))
    assert audit([str(folder), "--data", str(file_order["data"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ucch" in out and "660 of 660 identical codes" in out and "logged to run" not in out

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "codes.npz", alone / "codes.npz")
    assert audit([str(alone / "codes.npz"), "--data", str(file_order["data"])]) == 0
    out = capsys.readouterr().out
    assert "unknown (no protocol.json)" in out and "(no protocol.json beside codes.npz): not re-encoded" in out
    assert "standard " not in out  # nothing re-encoded


def test_runs_without_encoders_are_scored_on_their_own_codes_only(file_order, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = str(file_order["data"])
    assert train(["--data", data, *TRAIN_ARGS, "--set", "save_encoders=off", "--tracking-uri", uri]) == 0
    assert train(["--data", data, "--method", "cca-itq", "--set", "bits=16", "--tracking-uri", uri]) == 0
    capsys.readouterr()
    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name("agch").experiment_id]):
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "codes.npz" in names and "encoders.pt" not in names
        assert audit([run.info.run_id, "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert "has no encoders.pt, so its model cannot re-encode them" in out
        assert "other queries (59, self excluded)" in out and "ucch" not in out


def test_bad_input_is_one_line_naming_what_was_wrong(file_order, tiny_dataset, tmp_path, capsys):
    uri = file_order["uri"]
    run_id = file_order["run"].info.run_id

    def error(args: list[str]) -> str:
        assert audit(args) == 2
        return one_line_error(capsys, "agch-audit")

    assert "unknown run '0123456789abcdef0123456789abcdef' in tracking store" in error(
        ["0123456789abcdef0123456789abcdef", "--tracking-uri", uri])
    assert "'no-such-thing' is neither an existing file nor an MLflow run id" in error(["no-such-thing"])
    # a run with no codes (here: one that recorded nothing)
    client = MlflowClient(uri)
    empty = client.create_run(client.get_experiment_by_name("agch").experiment_id, run_name="empty").info.run_id
    assert f"run {empty} ('empty', RUNNING) has no codes.npz artifact" in error([empty, "--tracking-uri", uri])
    # a dataset that is not the run's
    message = error([run_id, "--tracking-uri", uri, "--data", str(tiny_dataset)])
    assert f"--data: dataset {tiny_dataset}" in message and f"is not the dataset run {run_id} was computed on" in message
    not_codes = tmp_path / "codes.npz"
    np.savez(not_codes, something=np.zeros(3))
    assert "not an agch codes.npz (missing codes_query_image" in error([str(not_codes)])
    assert "unknown device 'tpu'" in error([run_id, "--device", "tpu"])


def test_encoders_reencode_exactly_what_training_encoded(file_order, tmp_path):
    """The logged hash functions are small at test sizes and load into a fresh model (agch.method.model)."""
    import torch

    from agch import config as cfg
    from agch.method.model import AGCH

    client = MlflowClient(file_order["uri"])
    path = client.download_artifacts(file_order["run"].info.run_id, "encoders.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"norm", "image", "text"}  # no GCN, no fusion
    assert Path(path).stat().st_size < 1_000_000
    config = cfg.apply(cfg.preset("paper"), {**TINY, "bits": 32})
    with pytest.raises(UserError, match="does not fit this model"):
        AGCH(256, 1386, config).load_encoder_state(state)

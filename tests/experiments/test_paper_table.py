"""agch-table: a tiny real table through Ray Tune and MLflow (cells reused on a second run), and bad input."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agch.cli.table import main
from agch.experiments.paper_table import PUBLISHED, comparability
from tests.conftest import one_line_error

TABLE_ARGS = ["--bits", "16,32", "--seeds", "2", "--epochs", "1", "--set", "text_hidden=64", "--set", "gcn_hidden=64",
              "--device", "cpu", "--experiment", "tab"]


@pytest.mark.slow
def test_table_beside_the_published_numbers_then_every_cell_reused(tiny_dataset, ray_session, private_home, capsys,
                                                                   tmp_path):
    assert main(["--data", str(tiny_dataset), *TABLE_ARGS]) == 0
    out = capsys.readouterr().out
    assert "every mAP below: mAP@50 / mAP@ALL, 16/32 bits, standard split, test queries (100 vs 500 database)" in out
    assert "mean ± std over 2 seeds (0, 1)" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "task", "metric", "16", "bits", "32", "bits"]
    assert any(line.startswith("AGCH (published)") and "I->T" in line and "0.865" in line and "0.887" in line
               for line in lines)
    assert any(line.startswith("DJSRH (published)") and "T->I" in line and "0.786" in line for line in lines)
    assert "THE PUBLISHED NUMBERS ARE FOR A DIFFERENT DATASET: MIRFlickr-25K" in out
    assert "4 cell × seed runs: 4 trained now, 0 reused" in out

    uri = f"sqlite:///{private_home / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tab").experiment_id
    [parent] = client.search_runs([experiment], "tags.`agch.kind` = 'table'")
    assert parent.info.status == "FINISHED" and parent.data.params["bits"] == "16/32"
    assert parent.data.tags["agch.protocol"].startswith("mAP@50 / mAP@ALL, 16/32 bits")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.params["bits"], c.data.params["seed"]) for c in children) == [
        ("16", "0"), ("16", "1"), ("32", "0"), ("32", "1")]
    assert len({c.data.tags["agch.group"] for c in children}) == 1  # both code lengths in one Tune grid
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.csv", "trials.csv", "table.png"} <= artifacts
    table = list(csv.DictReader(io.StringIO(
        Path(client.download_artifacts(parent.info.run_id, "table.csv", str(tmp_path))).read_text())))
    for bits in ("16", "32"):  # each cell is the mean over its seeds' runs, computed here independently
        values = [c.data.metrics["map50_i2t"] for c in children if c.data.params["bits"] == bits]
        [row] = [r for r in table if r["source"] == "this project" and r["bits"] == bits
                 and r["direction"] == "I->T" and r["metric"] == "mAP@50"]
        assert float(row["mean"]) == pytest.approx(statistics.mean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
        assert (row["split"], row["queries"], row["n_query"], row["synthetic"]) == (
            "standard", "test", "100", "image,labels,text")
    published = [r for r in table if r["method"] == "AGCH" and r["direction"] == "T->I"]
    assert [(r["bits"], float(r["mean"]), r["dataset"]) for r in published] == [
        ("16", 0.829, "MIRFlickr-25K"), ("32", 0.849, "MIRFlickr-25K")]

    assert main(["--data", str(tiny_dataset), *TABLE_ARGS]) == 0
    again = capsys.readouterr().out
    assert "4 of 4 cell × seed runs are already recorded" in again
    assert "4 cell × seed runs: 0 trained now, 4 reused from earlier runs" in again
    assert [line for line in again.splitlines() if line.startswith("paper (this project)")] == \
        [line for line in lines if line.startswith("paper (this project)")]


@pytest.mark.parametrize("args, message", [
    (["--bits", "16,x"], "--bits expects comma-separated integers such as 16,32,64,128, got '16,x'"),
    (["--bits", "16,16"], "--bits lists a code length twice"),
    (["--bits", "2"], "bits must be in [4, 1024], got 2"),
    (["--set", "bits=32"], "--set: bits is set by --bits in agch-table"),
    (["--set", "seed=3"], "--set: seed is set by --seed and --seeds in agch-table"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--preset", "papr"], "unknown preset 'papr' (did you mean 'paper'?)"),
    (["--data", "/no/such.h5"], "dataset /no/such.h5: no such file"),
])
def test_bad_input_is_one_line(args, message, tiny_dataset, capsys):
    data = [] if "--data" in args else ["--data", str(tiny_dataset)]
    assert main([*data, *args]) == 2
    assert message in one_line_error(capsys, "agch-table")


def test_published_numbers_are_flagged_as_another_dataset_unless_they_are_not():
    mirflickr = {"dataset": "mirflickr25k", "synthetic": "none", "split": "standard", "queries": "test",
                 "n_query": 2000, "n_database": 18015}
    assert comparability(mirflickr, 50) == []
    assert "DIFFERENT DATASET" in comparability(dict(mirflickr, synthetic="image"), 50)[0]
    assert "DIFFERENT DATASET" in comparability(dict(mirflickr, dataset="wiki-train-dev"), 50)[0]
    assert comparability(mirflickr, 100) == ["this table is mAP@100; the published numbers are mAP@50"]
    assert "validation queries (400 vs 15615 database)" in comparability(
        dict(mirflickr, queries="validation", n_query=400, n_database=15615), 50)[0]
    assert PUBLISHED.values[("AGCH", "i2t")] == (0.865, 0.887, 0.892, 0.912)

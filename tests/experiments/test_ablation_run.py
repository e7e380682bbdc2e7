"""A tiny real ablation through Ray Tune and MLflow on CPU: verdicts, MLflow layout, reuse, resume.

One arm is broken on purpose: quantization with quant_weight = 1000 pins every code to the same corner (the
code diagnostics show it), so it must come out 'hurts'; alignment with align_weight = 0 trains exactly the same
model as alignment off, so that pair must show no detectable effect. The dataset is the tiny synthetic set with
images STRONG_IMAGES (conftest), so that 6 epochs learn something the broken arm clearly loses.
All tests share this process's Ray session (the runner starts it once).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
from pathlib import Path

import pytest
import yaml

from agch import config as cfg
from agch.experiments.ablation import run_ablation
from agch.experiments.ablation_report import analyse, publish, report_tables
from agch.experiments.ablation_plan import build_plan
from agch.experiments.ablation_spec import load_spec
from agch.cli.ablate import main
from tests.conftest import STRONG_IMAGES

pytestmark = pytest.mark.slow

SEEDS = 3
TINY_ABLATION = {
    "name": "tiny-broken",
    "design": "one-fix",
    "fixes": ["quantization", "alignment"],
    "seeds": SEEDS,
    "bits": 32,
    "epochs": 6,
    "overrides": {"batch_size": 32, "text_hidden": 64, "gcn_hidden": 64, "image_hidden": 0, "lr_image": 0.01,
                  "eval_every": 6, "quant_weight": 1000, "align_weight": 0},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """One AGCH_HOME (tracking store and artifacts) for the module, so a later test can reuse what an earlier one
    recorded. Tests select it by AGCH_HOME, not --tracking-uri: then the artifacts land beside it too."""
    root = tmp_path_factory.mktemp("ablation-home")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "root": str(root)}


@pytest.fixture
def in_store(store, private_home, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("AGCH_HOME", store["root"])
    return store


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    from agch.data.synth import build_synthetic_dataset

    root = tmp_path_factory.mktemp("ablation-data")
    data = build_synthetic_dataset(root / "tiny.h5", seed=0, n=600, image=STRONG_IMAGES, n_query=100, n_train=300)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_ABLATION, "dataset": str(data)}))
    return path


def client(store: dict[str, str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store["uri"])


def runs(store: dict[str, str], filter_string: str = "") -> list:
    c = client(store)
    experiment = c.get_experiment_by_name("abl")
    return list(c.search_runs([experiment.experiment_id], filter_string, max_results=1000))


def parent_artifact(store: dict[str, str], run_id: str, name: str, tmp_path: Path) -> str:
    return Path(client(store).download_artifacts(run_id, name, str(tmp_path))).read_text()


@pytest.fixture(scope="module")
def first_ablation(tiny_file, store) -> str:
    """The tiny ablation run once through agch-ablate into the module's store; its console output."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("AGCH_HOME", store["root"])
        assert main([str(tiny_file), "--experiment", "abl"]) == 0
    return out.getvalue()


def test_broken_arm_hurts_identical_arm_has_no_effect_and_mlflow_layout(first_ablation, tiny_file, store, tmp_path):
    out = first_ablation
    assert "mAP@50 and mAP@ALL" in out and "32 bits, standard split, validation queries (100 vs 400 database)" in out
    assert "references on the same queries (32 bits): random ranking mAP@50" in out
    assert "/runs?viewStateShareKey=tiny-broken&workflowType=machine_learning" in out  # the ablation's saved view
    assert out.index("every mAP below: mAP@50 / mAP@ALL, 32 bits, standard split") < out.index("mAP@50 (mean of")
    parents = runs(store, "tags.`agch.kind` = 'ablation'")
    parent = parents[-1].info.run_id  # the oldest: the first ablation
    assert parents[-1].info.status == "FINISHED"
    # every run names its protocol: the parent what its report's numbers are, each trial its own
    assert parents[-1].data.tags["agch.protocol"].startswith("mAP@50 / mAP@ALL, 32 bits, standard split, validation")
    assert {"reference_random_map50", "reference_cca_itq_mapall_t2i"} <= set(parents[-1].data.metrics)
    table = list(csv.DictReader(io.StringIO(parent_artifact(store, parent, "comparisons.csv", tmp_path))))
    rows = {(r["factor"], r["metric"]): r for r in table}
    broken = rows[("quantization", "mAP@50 I->T")]
    assert broken["verdict"] == "hurts" and float(broken["ci_high"]) < 0, out
    for metric in ("mAP@50 I->T", "mAP@50 T->I", "mAP@ALL I->T", "mAP@ALL T->I"):
        same = rows[("alignment", metric)]
        assert same["verdict"] == f"no effect: identical at all {SEEDS} seeds" and float(same["diff_mean"]) == 0.0
    assert {r["bits"] for r in table} == {"32"} and {r["split"] for r in table} == {"standard"}

    # One nested run per cell × seed, each with the full flat config as params and its identity tag.
    plan = build_plan(load_spec(tiny_file), client(store).get_run(parent).data.tags["dataset.identity"])
    children = runs(store, f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == len(plan.trials()) == 3 * SEEDS
    assert {c.data.tags["agch.identity"] for c in children} == {t.identity for t in plan.trials()}
    keys = set(cfg.to_flat(cfg.Config()))
    labels = {c.label for c in plan.cells.values()}
    for child in children:  # the broken arm's codes collapse: a result, its run FINISHED and tagged collapsed
        collapsed = child.data.tags["agch.collapsed"] == "True"
        tags = child.data.tags
        assert tags["agch.arm"] in labels and child.info.run_name == f"{tags['agch.arm']} s{tags['agch.seed']}"
        assert tags["agch.name"] == "tiny-broken" and tags["agch.role"] == "trial"
        assert tags["agch.protocol"].startswith("32 bits, standard split, validation queries (100 vs 400 database)")
        assert child.info.status == "FINISHED" and set(child.data.params) == keys
        assert child.data.params["eval_split"] == "validation"  # an ablation compares settings: off the test queries
        assert collapsed == (child.data.params["fixes.quantization"] == "True")
        config = cfg.from_flat(child.data.params)
        assert cfg.identity(config, dataset=plan.dataset_identity) == child.data.tags["agch.identity"]
    seeds = sorted(int(c.data.params["seed"]) for c in children)
    assert seeds == sorted(list(range(SEEDS)) * 3)
    # each comparison's effect and verdict on the parent, as metrics and tags the runs table can show
    recorded = client(store).get_run(parent).data
    assert recorded.metrics["effect.quantization.one-fix.paper.map50_i2t"] == pytest.approx(float(broken["diff_mean"]), abs=1e-4)
    assert recorded.metrics["effect.quantization.one-fix.paper.map50_i2t.ci_high"] < 0
    assert recorded.tags["agch.verdict.quantization.one-fix.paper.map50_i2t"] == "hurts"
    assert "| quantization (one-fix, paper) | mAP@50 I->T | 3 |" in recorded.tags["mlflow.note.content"]
    artifacts = {a.path for a in client(store).list_artifacts(parent)}
    with pytest.MonkeyPatch.context() as patch:  # the report, read back from the tracking store alone
        patch.setenv("AGCH_HOME", store["root"])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["show", "tiny-broken", "--experiment", "abl"]) == 0
    assert "| quantization (one-fix, paper) | mAP@50 I->T | 3 |" in out.getvalue() and "| hurts |" in out.getvalue()
    assert {"ablation.yaml", "results.md", "comparisons.csv", "trials.csv", "effects.png"} <= artifacts


def test_recorded_cells_are_reused_not_retrained(first_ablation, tiny_file, in_store, capsys):
    store = in_store
    before = len(runs(store, "tags.`agch.identity` != ''"))
    assert main([str(tiny_file), "--experiment", "abl"]) == 0
    out = capsys.readouterr().out
    total = 3 * SEEDS
    assert f"{total} of {total} cell × seed runs are already recorded" in out
    assert f"0 trained now, {total} reused from earlier runs" in out
    assert f"reused {total} run(s) recorded by tiny-broken (experiment " in out  # and where they came from
    assert "hurts" in out
    assert len(runs(store, "tags.`agch.identity` != ''")) == before  # nothing trained
    latest = runs(store, "tags.`agch.kind` = 'ablation'")[0]  # newest first
    assert latest.data.tags["agch.reused"] == str(total) and latest.data.tags["agch.trained"] == "0"
    assert latest.info.status == "FINISHED"
    # One seed: it runs (here: reuses), and every row says that no verdict is possible.
    assert main([str(tiny_file), "--experiment", "abl", "--seeds", "1"]) == 0
    captured = capsys.readouterr()
    assert "1 seed: the runs go ahead, but no verdict is possible" in captured.err
    assert captured.out.count("no verdict possible (1 seed; need >= 2)") == 8
    # A run recorded at another precision (bf16 on a GPU) is not the same result: it is retrained, not reused.
    seed0 = [r for r in runs(store, "tags.`agch.identity` != ''") if r.data.params["seed"] == "0"]
    client(store).set_tag(seed0[0].info.run_id, "agch.precision", "bf16")
    assert main([str(tiny_file), "--experiment", "abl", "--seeds", "1"]) == 0
    assert "1 trained now, 2 reused from earlier runs" in capsys.readouterr().out


def test_resume_after_interruption_retrains_nothing_and_duplicates_no_run(tiny_file, tmp_path, capsys):
    raw = yaml.safe_load(tiny_file.read_text())
    raw.update(name="tiny-resume", fixes=["balance"], seeds=2, epochs=30, max_concurrent=2,
               overrides={**raw["overrides"], "eval_every": 5})
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(raw))
    from agch.paths import default_tracking_uri

    store = {"uri": default_tracking_uri()}  # in this test's own AGCH_HOME
    interrupted = []

    def ctrl_c_after_first_trial(label: str, seed: int, metrics: dict) -> None:
        if metrics.get("agch_final") and not interrupted:  # a trial just finished; the driver gets Ctrl-C
            interrupted.append((label, seed))
            os.kill(os.getpid(), signal.SIGINT)

    first = run_ablation(load_spec(path), Path(raw["dataset"]), experiment="abl",
                         on_result=ctrl_c_after_first_trial, say=lambda _: None)
    assert interrupted and first.interrupted
    results = analyse(first)
    publish(first, results, report_tables(first, results))  # as agch-ablate does: the parent ends KILLED
    assert client(store).get_run(first.parent_run_id).info.status == "KILLED"
    # no scheduler: the trials Ctrl-C ended are interrupted (resumable), not early-stopped
    assert "stopped" not in {r.data.tags.get("agch.status") for r in runs(store) if "agch.identity" in r.data.tags}
    done_before = {r.trial.identity: r.run_id for r in first.records if r.status == "finished"}
    assert 1 <= len(done_before) < 4

    assert main([str(path), "--experiment", "abl"]) == 0
    out = capsys.readouterr().out
    assert f"resuming the interrupted run of this ablation (MLflow run {first.parent_run_id})" in out
    assert "resuming Ray Tune experiment" in out  # the interrupted grid is restored, not started afresh
    assert f"{len(done_before)} finished before an interruption" in out
    children = [r for r in runs(store) if "agch.identity" in r.data.tags]
    identities = [r.data.tags["agch.identity"] for r in children]
    assert len(identities) == len(set(identities)) == 4  # every cell × seed once: no second run for any
    assert all(r.info.status == "FINISHED" for r in children)
    for identity, run_id in done_before.items():  # finished before the interruption: kept, not retrained
        assert [r.info.run_id for r in children if r.data.tags["agch.identity"] == identity] == [run_id]
    parents = runs(store, "tags.`agch.kind` = 'ablation'")
    assert [p.info.run_id for p in parents] == [first.parent_run_id] and parents[0].info.status == "FINISHED"


def test_datasets_axis_pairs_the_same_cells_on_two_datasets_by_seed(tiny_file, tmp_path, capsys):
    """The same pairs, labels and split with informative vs uninformative image features: the dataset comparison
    must come out 'hurts' with paired statistics, each trial training on its own dataset."""
    import numpy as np

    from agch.data.dataset import META_KEYS, open_dataset, write_dataset
    from agch.errors import UserError
    from agch.paths import default_tracking_uri

    strong = Path(yaml.safe_load(tiny_file.read_text())["dataset"])

    def variant(name: str, image=None, labels=None) -> Path:
        with open_dataset(strong) as ds:
            everything = np.arange(ds.n)
            out = write_dataset(tmp_path / f"{name}.h5", image=ds.rows("image", everything) if image is None else image,
                                text=ds.rows("text", everything), labels=ds.labels if labels is None else labels,
                                split=ds.split, meta={**{k: ds.meta[k] for k in META_KEYS}, "name": name})
        return out

    with open_dataset(strong) as ds:
        noise = variant("noise", image=np.random.default_rng(1).random((ds.n, ds.image_dim), dtype=np.float32))
        flipped = ds.labels.copy()
        flipped[7, 0] ^= 1
        other = variant("other-labels", labels=flipped)
    raw = {"name": "features", "design": "one-fix", "seeds": SEEDS, "bits": 32, "epochs": 6,
           "overrides": {k: v for k, v in TINY_ABLATION["overrides"].items()
                         if k not in ("quant_weight", "align_weight")},
           "datasets": {"strong": str(strong), "noise": str(noise)}}
    path = tmp_path / "features.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the datasets' order says which is 'off'
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "datasets": {"strong": str(strong), "other": str(other)}}, sort_keys=False))
    with pytest.raises(UserError, match=r"datasets strong \(.*tiny.h5, 600 items\) and other \(.*other-labels.h5, "
                                        r"600 items\) differ in their labels; a dataset comparison needs the same "
                                        r"pairs, labels and split"):
        run_ablation(load_spec(bad), None, experiment="abl", say=lambda _: None)
    assert main([str(bad), "--experiment", "abl"]) == 2 and "differ in their labels" in capsys.readouterr().err
    assert main([str(path), "--data", str(strong), "--experiment", "abl"]) == 2
    assert "--data: this ablation compares the datasets its file names (strong, noise)" in capsys.readouterr().err

    assert main([str(path), "--experiment", "abl"]) == 0
    out = capsys.readouterr().out
    assert "over dataset strong->noise; seeds 0, 1, 2; dataset strong " in out
    assert "dataset strong = mirflickr-like" in out and " vs noise = noise (synthetic parts: " in out
    assert "references on the same queries (strong): random ranking" in out and "queries (noise): random" in out
    store = {"uri": default_tracking_uri()}
    parent = runs(store, "tags.`agch.kind` = 'ablation'")[0]
    table = list(csv.DictReader(io.StringIO(parent_artifact(store, parent.info.run_id, "comparisons.csv", tmp_path))))
    assert {r["comparison"] for r in table} == {"dataset strong->noise (one-fix, paper)"}
    for row in table:
        assert row["n"] == str(SEEDS) and float(row["diff_mean"]) < 0
    i2t = next(r for r in table if r["metric"] == "mAP@50 I->T")
    assert i2t["verdict"] == "hurts" and float(i2t["ci_high"]) < 0, out
    children = runs(store, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    with open_dataset(strong) as a, open_dataset(noise) as b:
        identities = sorted([a.identity] * SEEDS + [b.identity] * SEEDS)
    assert sorted(c.data.tags["dataset.identity"] for c in children) == identities  # each trained on its dataset

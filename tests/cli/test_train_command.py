"""agch-train end to end: a real MLflow store, the logged layout, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from agch import config as cfg
from agch.cli.train import main
from agch.config import to_flat
from agch.evaluation.metrics import evaluate_hashing
from tests.conftest import TINY

TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def _store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_is_logged_with_config_metrics_tags_and_codes(tiny_dataset, tmp_path, capsys):
    uri = _store(tmp_path)
    code = main(["--data", str(tiny_dataset), *TINY_ARGS, "--fix", "alignment=on", "--seed", "3",
                 "--tracking-uri", uri, "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "mAP@50: I->T" in out and "mAP@ALL" in out and "16 bits" in out and "standard split" in out
    assert "mAP@50(mean) below = mean of I->T and T->I, 16 bits, standard split" in err  # before the progress bar
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("agch").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["fixes.alignment"] == "True" and run.data.params["seed"] == "3"
    assert run.data.params["delta"] == "0.01" and set(run.data.params) >= set(to_flat_keys())
    for key in ("map50_i2t", "map50_t2i", "mapall_i2t", "mapall_t2i", "unique_frac_image", "pair_hamming"):
        assert key in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "loss_total")) == TINY["epochs"]
    tags = run.data.tags
    assert tags["dataset.synthetic"] != "none" and len(tags["dataset.identity"]) == 64
    assert tags["agch.protocol"].startswith("16 bits, standard split, test queries")
    assert tags["agch.code_version"].startswith("0.1.0") and tags["agch.status"] == "finished"

    # the codes artifact re-evaluates to the logged mAP with an independent call
    local = client.download_artifacts(run.info.run_id, "codes.npz", str(tmp_path))
    codes = {k: torch.from_numpy(v) for k, v in np.load(local).items()}
    res = evaluate_hashing(codes["codes_query_image"], codes["codes_retrieval_text"], codes["labels_query"],
                           codes["labels_retrieval"], ks=(50, None))
    assert res.map["map@50"] == pytest.approx(run.data.metrics["map50_i2t"], abs=1e-9)


def to_flat_keys():
    from agch.config import Config

    return to_flat(Config())


def test_config_file_is_accepted_and_logged_config_round_trips(tiny_dataset, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("preset: debug-log\nbits: 16\nepochs: 2\ntext_hidden: 32\ngcn_hidden: 32\n"
                           "fixes:\n  balance: off\n")
    uri = _store(tmp_path)
    assert main(["--data", str(tiny_dataset), "--config", str(config_file), "--tracking-uri", uri,
                 "--device", "cpu"]) == 0
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("agch").experiment_id])
    assert run.data.params["fixes.balance"] == "False" and run.data.params["distance"] == "sqrt"
    logged = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    second = tmp_path / "second.db"
    assert main(["--data", str(tiny_dataset), "--config", logged, "--tracking-uri", f"sqlite:///{second}",
                 "--device", "cpu"]) == 0
    client2 = MlflowClient(f"sqlite:///{second}")
    [run2] = client2.search_runs([client2.get_experiment_by_name("agch").experiment_id])
    assert run2.data.params == run.data.params
    assert run2.data.metrics["map50_i2t"] == run.data.metrics["map50_i2t"]  # same seed, same device


def test_plain_s_method_trains_the_reference_and_logs_its_own_config(tiny_dataset, tmp_path, capsys):
    uri = _store(tmp_path)
    assert main(["--data", str(tiny_dataset), "--method", "plain-s", "--preset", "real-features", "--set", "bits=16",
                 "--set", "gamma_v=0.3", "--seed", "1", "--tracking-uri", uri, "--device", "cpu"]) == 0
    assert "mAP@ALL: I->T" in capsys.readouterr().out
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("agch").experiment_id])
    assert run.data.tags["agch.method"] == "plain-s" and run.data.tags["mlflow.runName"] == "plain-s-16bit-seed1"
    params = run.data.params
    assert (params["no_gcn"], params["no_fusion"], params["gamma_v"], params["batch_size"]) == ("True", "True", "1.0",
                                                                                                 "128")
    assert (params["bits"], params["seed"]) == ("16", "1")
    assert len(client.get_metric_history(run.info.run_id, "loss_total")) == 60 and "mapall_t2i" in run.data.metrics


@pytest.mark.parametrize("args, message", [
    (["--preset", "papr"], "unknown preset 'papr' (did you mean 'paper'?)"),
    (["--fix", "alignmnt=on"], "unknown fix 'alignmnt' (did you mean 'alignment'?)"),
    (["--set", "detla=1"], "unknown config key 'detla' (did you mean 'delta'?)"),
    (["--set", "lr_text=-1"], "lr_text must be a finite number > 0"),
    (["--set", "batch_size=1"], "batch_size must be >= 2"),
    (["--set", "bits=3"], "bits must be in [4, 1024]"),
    (["--set", "delta"], "--set expects KEY=VALUE"),
    (["--data", "/nonexistent/x.h5"], "/nonexistent/x.h5"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tiny_dataset, tmp_path, capsys, args, message):
    base = ["--data", str(tiny_dataset), "--tracking-uri", _store(tmp_path)]
    code = main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("agch-train: error:") and err.count("\n") == 1


def test_malformed_dataset_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["--data", str(bad), "--tracking-uri", _store(tmp_path)]) == 2
    assert "bad.h5" in capsys.readouterr().err


def test_nan_run_is_marked_failed_with_epoch_and_keeps_what_was_logged(tiny_dataset, tmp_path, capsys):
    uri = _store(tmp_path)
    lrs = ["--set", "lr_text=1e12", "--set", "lr_fusion=1e12", "--set", "lr_gcn=1e12", "--set", "lr_image=1e12"]
    code = main(["--data", str(tiny_dataset), *TINY_ARGS, *lrs, "--tracking-uri", uri, "--device", "cpu"])
    assert code == 1
    assert "non-finite loss" in capsys.readouterr().err
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("agch").experiment_id])
    assert run.info.status == "FAILED" and "epoch" in run.data.tags["agch.reason"]
    assert run.data.params["lr_text"] == "1000000000000.0"


def test_unreachable_tracking_server_fails_before_training(tiny_dataset, capsys):
    assert main(["--data", str(tiny_dataset), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_eval_split_option_is_the_set_it_stands_for_and_checks_its_value(capsys):
    from agch.cli.common import config_from_args
    from agch.cli.train import build_parser

    args = build_parser().parse_args(["--eval-split", "validation"])
    assert config_from_args(args)[1].eval_split == "validation"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--eval-split", "queries"])
    assert "must be one of test, validation, got 'queries'" in capsys.readouterr().err


def test_one_config_layering_for_train_search_and_ablate(tmp_path):
    """--preset beats the --config file's preset; --set beats the file; --fix and --seed come last: in all three."""
    from agch.cli.ablate import build_parser as ablate_parser
    from agch.cli.ablate import spec_from_args
    from agch.cli.common import config_from_args, config_layers
    from agch.cli.search import build_parser as search_parser
    from agch.cli.train import build_parser

    base = tmp_path / "base.yaml"
    base.write_text("preset: debug-log\ndelta: 0.5\nbits: 16\nfixes:\n  balance: on\n")
    line = ["--config", str(base), "--preset", "paper", "--set", "bits=32", "--fix", "balance=off"]
    preset, config = config_from_args(build_parser().parse_args([*line, "--seed", "3"]))
    assert (preset, config.delta, config.bits, config.fixes.balance, config.seed) == ("paper", 0.5, 32, False, 3)
    assert config.distance == cfg.preset("paper").distance  # the paper preset, not the file's debug-log
    preset, layers = config_layers(search_parser().parse_args(["run", "space.yaml", *line, "--seed", "3"]))
    overrides = cfg.layered_keys(layers)
    assert preset == "paper" and overrides == {"delta": 0.5, "bits": "32", "fixes.balance": "off", "seed": 3}
    spec = spec_from_args(ablate_parser().parse_args(["--fix", "alignment", *line]))
    assert {d.preset for d in spec.designs} == {"paper"}
    assert spec.overrides["delta"] == 0.5 and spec.overrides["bits"] == "32" and spec.overrides["fixes.balance"] == "off"
    preset, config = config_from_args(build_parser().parse_args(["--config", str(base)]))
    assert preset == "debug-log" and config.bits == 16  # without --preset the file's own preset holds

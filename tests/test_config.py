"""Config, presets, overrides and validation."""

from __future__ import annotations

import pytest

from agch import config as cfg
from agch.errors import UserError


def test_paper_preset_is_the_papers_mirflickr_setting():
    c = cfg.preset("paper")
    assert (c.rho, c.delta, c.alpha, c.beta, c.lam, c.gamma_v, c.gamma_t) == (4.0, 0.01, 1.0, 1.0, 10.0, 2.0, 0.3)
    assert (c.batch_size, c.epochs, c.momentum, c.weight_decay) == (32, 40, 0.9, 5e-4)
    assert (c.lr_image, c.lr_text, c.lr_gcn, c.lr_fusion) == (1e-4, 1e-2, 1e-3, 1e-2)
    assert c.fixes.similarity and not any(getattr(c.fixes, n) for n in cfg.FIX_NAMES if n != "similarity")


def test_debug_log_preset_turns_every_fix_on():
    c = cfg.preset("debug-log")
    assert all(getattr(c.fixes, n) for n in cfg.FIX_NAMES)
    assert c.distance == "sqrt"


@pytest.mark.parametrize("bad, message", [
    ({"detla": 1}, "did you mean 'delta'"),
    ({"fixes.alignmnt": "on"}, "did you mean 'alignment'"),
    ({"lr_text": -0.1}, "lr_text must be a finite number > 0"),
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"bits": 2}, "bits must be in [4, 1024]"),
    ({"bits": 4.5}, "bits must be an integer"),
    ({"distance": "manhattan"}, "distance must be one of euclidean, sqrt"),
    ({"fixes.balance": "maybe"}, "fixes.balance must be on/off"),
    ({"delta": "abc"}, "delta must be a number"),
])
def test_bad_overrides_name_the_problem(bad, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.apply(cfg.preset("paper"), bad)


def test_unknown_preset_suggests_close_match():
    with pytest.raises(UserError, match="unknown preset 'papr' \\(did you mean 'paper'\\?\\)"):
        cfg.preset("papr")


def test_fix_aliases_and_string_values():
    c = cfg.apply(cfg.preset("paper"), {"fixes": {"text-input": "on"}, "delta": "1.5", "bits": "32"})
    assert c.fixes.text_input and c.delta == 1.5 and c.bits == 32


def test_flat_round_trip_and_identity():
    c = cfg.apply(cfg.preset("debug-log"), {"seed": 3, "delta": 0.5})
    flat = {k: str(v) for k, v in cfg.to_flat(c).items()}  # MLflow hands params back as strings
    assert cfg.from_flat(flat) == c
    assert cfg.identity(c) == cfg.identity(cfg.apply(c, {"eval_every": 7}))  # not scientific
    assert cfg.identity(c) != cfg.identity(cfg.apply(c, {"seed": 4}))
    assert cfg.identity(c, dataset="a") != cfg.identity(c, dataset="b")


def test_real_features_preset_is_the_paper_with_the_learning_settings():
    paper, real = cfg.preset("paper"), cfg.preset("real-features")
    assert (real.feature_norm, real.optimizer, real.image_hidden) == ("standardize", "adam", 256)
    assert real.fixes == paper.fixes and real.rho == paper.rho and real.bits == paper.bits
    assert set(cfg.PRESETS) == {"paper", "debug-log", "real-features", "real-features-per-sample", "plain-s"}


def test_real_features_per_sample_is_real_features_with_per_sample_code_terms_and_their_weights():
    real, per_sample = cfg.to_flat(cfg.preset("real-features")), cfg.to_flat(cfg.preset("real-features-per-sample"))
    assert {k for k in real if real[k] != per_sample[k]} == {"per_sample_codes", "lam", "delta"}
    assert per_sample["per_sample_codes"] and per_sample["lam"] < real["lam"] and per_sample["delta"] < real["delta"]
    assert cfg.identity(cfg.preset("real-features-per-sample")) != cfg.identity(cfg.preset("real-features"))


def test_the_python_the_project_declares_is_the_one_it_needs_and_runs_on():
    """hashlib.file_digest (agch.data.importers.file_sha256) needs 3.11; pyproject must not promise less."""
    import sys
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared.split("#")[0].strip() == ">=3.11" and sys.version_info >= (3, 11)

"""Shared fixtures: tiny synthetic datasets and a private AGCH_HOME per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from agch import config as cfg
from agch.data.synth import ImageModel, build_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A model small enough that a few epochs take seconds on 2 CPU cores.
TINY = {"bits": 16, "epochs": 4, "eval_every": 2, "batch_size": 32, "text_hidden": 64, "gcn_hidden": 64}

# Images far easier than the calibrated default (docs/synthetic-data.md): no nuisance, one visual mode per label and
# 20% active units, so that a few epochs on 300 pairs learn something the tests can tell from chance.
STRONG_IMAGES = ImageModel(dim=256, signal=1.0, n_modes=1, active_fraction=0.2)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 600-pair fully synthetic MIRFlickr-like set: 256-d images, 100 queries, 300 training pairs.

    Its images are STRONG_IMAGES, far easier than the calibrated default's.
    """
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    return build_synthetic_dataset(path, seed=0, n=600, image=STRONG_IMAGES, n_query=100, n_train=300)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that runs trials (starting it takes ~10 s); shut down at the end if started here."""
    from agch.runs import driver

    started = driver.start_ray(None, {"cpu": 1})
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture
def tiny_config() -> cfg.Config:
    return cfg.apply(cfg.preset("paper"), TINY)


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own AGCH_HOME, so nothing lands in the checkout."""
    home = tmp_path / "agch-home"
    monkeypatch.setenv("AGCH_HOME", str(home))
    return home


def one_line_error(capsys, prog: str) -> str:
    """What a CLI that just exited 2 printed on stderr, checked to be one line 'PROG: error: ...' (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


FAULT_REPORTS: list[str] = []
"""Counts (trials, runs, failures, retries) the integration tests record; printed at the end of the run."""


def pytest_terminal_summary(terminalreporter) -> None:
    if FAULT_REPORTS:
        terminalreporter.write_sep("-", "scale-out and fault counts")
        for line in FAULT_REPORTS:
            terminalreporter.write_line(line)

"""Where things live by default: one project-local folder holding the datasets cache and the tracking stores."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_DATASET_NAME = "mirflickr-like-synthetic-seed0.h5"


def home() -> Path:
    """The project-local folder: $AGCH_HOME, else ./.agch (always absolute: Ray trials run elsewhere)."""
    return Path(os.environ.get("AGCH_HOME", ".agch")).expanduser().resolve()


def default_tracking_uri() -> str:
    """The embedded MLflow store: an SQLite file under home(), as an absolute URI."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def default_dataset() -> Path:
    """The embedded default dataset (fully synthetic MIRFlickr-like), generated and cached on first use."""
    path = home() / "data" / DEFAULT_DATASET_NAME
    if not path.exists():
        from agch.data.synth import build_synthetic_dataset  # only when it must be generated

        print(f"generating the default synthetic MIRFlickr-like dataset at {path} (once)", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        build_synthetic_dataset(path, seed=0)
    return path

"""AGCH hyperparameter search and ablation service.

Public API (imported lazily, so `import agch` is cheap and does nothing):
    Config, preset, apply            — agch.config
    open_dataset                     — agch.data.dataset
    train, TrainResult, EpochReport  — agch.method.train
    evaluate_hashing                 — agch.evaluation.metrics
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "agch.config", "preset": "agch.config", "apply": "agch.config",
    "open_dataset": "agch.data.dataset",
    "train": "agch.method.train", "TrainResult": "agch.method.train", "EpochReport": "agch.method.train",
    "evaluate_hashing": "agch.evaluation.metrics",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agch' has no attribute {name!r}")
